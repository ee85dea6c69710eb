-- The session and what a presented refresh-token digest is to it.
-- KEYS: P s:{sid}, P c:{sid}:<hex of the digest's first 8 bytes>
-- ARGV: digest, its first 8 bytes
-- Returns nil, or {user, client, scopes, sexp, revoked, state, expires_ms, at_ms, sealed}
-- with state 1 = current (at_ms: when it was issued), 2 = rotated (at_ms: when), 0 = unknown.
local f = redis.call('HMGET', KEYS[1], 'user', 'client', 'scopes', 'sexp', 'rev', 'cur', 'cexp', 'rot', 'cat', 'created')
if not f[1] then return false end
local rev = tonumber(f[5])
if ct_eq(f[6], ARGV[1]) then
  return {f[1], f[2], f[3], tonumber(f[4]), rev, 1, tonumber(f[7]), tonumber(f[9] or f[10]), false}
end
local rot = f[8] or ''
local i = #rot - REC + 1
while i >= 1 do
  if string.sub(rot, i, i + 7) == ARGV[2] then
    local at, exp = struct.unpack('>I8>I8', rot, i + 8)
    return {f[1], f[2], f[3], tonumber(f[4]), rev, 2, exp, at, redis.call('GET', KEYS[2])}
  end
  i = i - REC
end
return {f[1], f[2], f[3], tonumber(f[4]), rev, 0, 0, 0, false}
