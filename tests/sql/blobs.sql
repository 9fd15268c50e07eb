-- exec
CREATE TABLE b(id INTEGER PRIMARY KEY, data BLOB);
INSERT INTO b(data) VALUES (CAST(printf('%.5000c', 'a') AS BLOB));
INSERT INTO b(data) VALUES (CAST(printf('%.100000c', 'b') AS BLOB));
INSERT INTO b(data) VALUES (CAST(printf('%.1500000c', 'c') AS BLOB));
INSERT INTO b(data) VALUES (zeroblob(70000));
-- query
SELECT id, length(data), hex(substr(data, 1, 4)), hex(substr(data, -3)) FROM b ORDER BY id;
-- exec
UPDATE b SET data = CAST(printf('%.20c', 'z') AS BLOB) WHERE id = 3;
-- query
SELECT id, length(data) FROM b ORDER BY id;
-- vacuum
-- query
SELECT id, length(data), hex(substr(data, 1, 2)) FROM b ORDER BY id;
-- query
PRAGMA integrity_check;
