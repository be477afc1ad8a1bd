-- A history database as chatcore's first release (schema version 1) wrote it.
-- Frozen: tests/test_store.py opens it with the current Store to prove the migration
-- keeps every row. Never edit this file to follow a new schema; add a new fixture.
PRAGMA journal_mode = WAL;
BEGIN;
CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            adapter TEXT NOT NULL,
            channel TEXT NOT NULL,
            user TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL
        );
CREATE INDEX conversations_by_key ON conversations (adapter, channel, user, id);
CREATE TABLE exchanges (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id),
            user_text TEXT NOT NULL,
            reply_text TEXT NOT NULL,
            created_at REAL NOT NULL,
            replied_at REAL NOT NULL,
            model_id TEXT,
            params TEXT NOT NULL DEFAULT '{}'
        );
CREATE INDEX exchanges_by_conversation ON exchanges (conversation_id, id);
CREATE TABLE finetunes (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            checkpoint TEXT,
            up_to_id INTEGER NOT NULL
        );
INSERT INTO conversations VALUES (1, 'discord', 'chan-1', '1001', 1700000000.0, 1700000100.0);
INSERT INTO conversations VALUES (2, 'discord', 'chan-1', '1001', 1700000200.0, NULL);
INSERT INTO conversations VALUES (3, 'stdin', 'local', 'ana', 1700000300.0, NULL);
INSERT INTO exchanges VALUES (1, 1, 'hello', 'hi there', 1700000000.0, 1700000001.5, 'gpt2-seed', '{"temperature": 0.8, "top_k": 200}');
INSERT INTO exchanges VALUES (2, 1, 'how are you?', 'fine, thanks', 1700000010.0, 1700000011.0, 'gpt2-seed', '{"temperature": 0.8, "top_k": 200}');
INSERT INTO exchanges VALUES (3, 2, 'new topic: café ☕', 'sure', 1700000200.0, 1700000201.0, 'ft-0001', '{"temperature": 0.7}');
INSERT INTO exchanges VALUES (4, 3, 'what is 2+2?', '4', 1700000300.0, 1700000302.0, NULL, '{}');
INSERT INTO exchanges VALUES (5, 3, 'and 3+3?', '6', 1700000310.0, 1700000311.0, 'ft-0001', '{}');
INSERT INTO finetunes VALUES (1, 1700000250.0, 'checkpoints/ft-0001', 3);
PRAGMA user_version = 1;
COMMIT;
