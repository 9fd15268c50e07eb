-- The demo's todo list, for a server run with `--mutators wasm/demo/mutators.sql`: a page whose
-- token may call mutators (`pagesync-server token --call '*' --sub NAME`) writes through these
-- alone. Anyone with the list adds and ticks todos; only a todo's owner deletes it.

-- mutator: setup()
CREATE TABLE IF NOT EXISTS todos (
  id INTEGER PRIMARY KEY,
  title TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 60),
  done INTEGER NOT NULL DEFAULT 0,
  owner TEXT NOT NULL DEFAULT ''
);

-- mutator: add_todo(title)
INSERT INTO todos (title, owner) VALUES (:title, :subject);

-- mutator: set_done(id, done)
UPDATE todos SET done = :done WHERE id = :id;

-- mutator: delete_own(id)
SELECT reject('only its owner may delete this todo') FROM todos WHERE id = :id AND owner IS NOT :subject;
DELETE FROM todos WHERE id = :id;
