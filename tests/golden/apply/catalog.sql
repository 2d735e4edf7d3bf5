SELECT a.attname, pg_catalog.format_type(a.atttypid, NULL),
  COALESCE((SELECT k.ord FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(n, ord)
            WHERE k.n = a.attnum), 0),
  a.attgenerated <> '',
  a.atthasdef AND pg_catalog.pg_get_expr(d.adbin, d.adrelid) OPERATOR(pg_catalog.~*)
   '(nextval|now|random|clock_timestamp|uuid|current_timestamp|timeofday|statement_timestamp|transaction_timestamp)'
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
  AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
ORDER BY a.attnum
