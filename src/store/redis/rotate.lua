-- Compare-and-set rotation: the presented digest must still be the session's current one.
-- KEYS: P s:{sid}, P c:{sid}:<hex of the presented digest's first 8 bytes>, P sessions
-- ARGV: presented, successor, successor_exp, access_exp, sealed ('' for none), now, grace,
--       max rotated records, sid
-- Returns 'rotated', 'lost', 'revoked' or 'gone'.
local f = redis.call('HMGET', KEYS[1], 'rev', 'cur', 'cexp', 'aexp', 'rot')
if not f[2] then return 'gone' end
if f[1] == '1' then return 'revoked' end
if not ct_eq(f[2], ARGV[1]) then return 'lost' end
local now, grace, texp = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[3])
local rot = f[5] or ''
-- Records are in rotation order, so the expired ones are at the front; past the bound the oldest go.
while #rot >= REC and struct.unpack('>I8', rot, 17) <= now do rot = string.sub(rot, REC + 1) end
if #rot >= tonumber(ARGV[8]) * REC then rot = string.sub(rot, REC + 1) end
rot = rot .. string.sub(ARGV[1], 1, 8) .. struct.pack('>I8>I8', now, tonumber(f[3]))
redis.call('HSET', KEYS[1], 'cur', ARGV[2], 'cexp', ARGV[3], 'cat', ARGV[6],
  'aexp', math.max(tonumber(f[4]), tonumber(ARGV[4])), 'rot', rot)
if grace > 0 and ARGV[5] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'PX', grace) end
redis.call('PEXPIRE', KEYS[1], math.max(texp - now, 1))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[9])
return 'rotated'
