-- exec
CREATE TABLE author(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, born INTEGER);
CREATE TABLE book(id INTEGER PRIMARY KEY, author_id INTEGER REFERENCES author(id), title TEXT, year INTEGER, price REAL);
CREATE INDEX book_year ON book(year);
-- exec
INSERT INTO author(name, born) VALUES ('Le Guin', 1929), ('Lem', 1921), ('Butler', 1947), ('Chiang', 1967);
-- exec
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
INSERT INTO book(author_id, title, year, price) SELECT (i % 4) + 1, 'Book ' || i, 1950 + (i * 7) % 70, (i * 13 % 50) + 0.25 FROM n;
-- query
SELECT a.name, count(*), min(b.year), max(b.year), round(avg(b.price), 3) FROM author a JOIN book b ON b.author_id = a.id GROUP BY a.name ORDER BY a.name;
-- query
SELECT title, year FROM book WHERE year BETWEEN 1960 AND 1962 ORDER BY year, title;
-- exec
ALTER TABLE book ADD COLUMN pages INTEGER DEFAULT 300;
UPDATE book SET pages = 100 + id WHERE id % 3 = 0;
CREATE VIEW expensive AS SELECT title, price FROM book WHERE price > 45;
-- query
SELECT count(*), sum(pages) FROM book;
-- query
SELECT * FROM expensive ORDER BY price DESC, title LIMIT 10;
-- exec
DELETE FROM book WHERE year < 1970;
DROP INDEX book_year;
CREATE INDEX book_author_year ON book(author_id, year DESC);
-- query
SELECT a.name, b.title FROM author a LEFT JOIN book b ON b.author_id = a.id AND b.year = 2000 ORDER BY a.name, b.title;
-- query
SELECT name FROM sqlite_schema WHERE name NOT LIKE '\_pagesync%' ESCAPE '\' ORDER BY name;
-- query
PRAGMA integrity_check;
