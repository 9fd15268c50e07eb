-- exec
CREATE TABLE big(id INTEGER PRIMARY KEY, grp INTEGER, payload TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
INSERT INTO big SELECT i, i % 97, printf('%08d-%.90c', i, char(97 + i % 26)) FROM n;
-- query
SELECT count(*), sum(length(payload)), min(payload), max(payload) FROM big;
-- query
SELECT grp, count(*) FROM big GROUP BY grp ORDER BY count(*) DESC, grp LIMIT 5;
-- query
SELECT payload FROM big WHERE id IN (1, 4242, 99999);
-- exec
DELETE FROM big WHERE id % 2 = 0;
-- vacuum
-- query
SELECT count(*), sum(id) FROM big;
-- query
PRAGMA integrity_check;
