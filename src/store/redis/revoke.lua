-- Revokes a session: see revoke_session.
-- KEYS: P s:{sid}, P revoked, P revocations
-- ARGV: prefix, sid, now, grace, stream maxlen
return revoke_session(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), KEYS[2], KEYS[3], ARGV[5])
