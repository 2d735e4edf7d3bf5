TRUNCATE ONLY "public"."users", "Sales"."Order ""Lines"" 2" RESTART IDENTITY CASCADE
