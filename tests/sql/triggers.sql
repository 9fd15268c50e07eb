-- exec
CREATE TABLE item(id INTEGER PRIMARY KEY, qty INTEGER NOT NULL CHECK (qty >= 0));
CREATE TABLE audit(seq INTEGER PRIMARY KEY AUTOINCREMENT, item INTEGER, old INTEGER, new INTEGER);
CREATE TRIGGER item_upd AFTER UPDATE OF qty ON item BEGIN
  INSERT INTO audit(item, old, new) VALUES (old.id, old.qty, new.qty);
END;
CREATE TRIGGER item_del BEFORE DELETE ON item WHEN old.qty > 0 BEGIN
  SELECT RAISE(ABORT, 'item still in stock');
END;
-- exec
INSERT INTO item(qty) VALUES (5), (0), (12);
UPDATE item SET qty = qty + 1;
-- reject
DELETE FROM item WHERE id = 1;
-- exec
UPDATE item SET qty = 0 WHERE id = 3;
DELETE FROM item WHERE qty = 0;
-- query
SELECT * FROM item ORDER BY id;
-- query
SELECT * FROM audit ORDER BY seq;
-- query
SELECT name, seq FROM sqlite_sequence;
