-- exec
CREATE TABLE s(k INTEGER, v TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000)
INSERT INTO s SELECT (i * 2654435761) % 1000003, printf('%.80c', char(65 + i % 26)) FROM n;
-- query
SELECT k, v FROM s ORDER BY v DESC, k LIMIT 5 OFFSET 30000;
-- query
SELECT count(*), sum(x) FROM (SELECT k AS x FROM s ORDER BY v, k);
-- query
SELECT count(DISTINCT k), count(DISTINCT v) FROM s;
-- exec
CREATE INDEX s_k ON s(k);
-- query
SELECT k FROM s WHERE k < 40 ORDER BY k;
