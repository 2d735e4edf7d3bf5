TRUNCATE ONLY "public"."users"
