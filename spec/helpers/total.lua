-- Adds up the counts the summary output handler wrote for each busted run of `make test`.
local path = assert(arg[1], "usage: total.lua SUMMARY_FILE [EXTRA_FAILURES]")
local passed, failed, skipped = 0, 0, 0
local f = io.open(path)
if f then
  for line in f:lines() do
    local p, fl, s = line:match("^(%d+) (%d+) (%d+)$")
    if p then
      passed, failed, skipped = passed + p, failed + fl, skipped + s
    end
  end
  f:close()
end
failed = failed + tonumber(arg[2] or 0)
io.write(string.format("Total: %d passed, %d failed, %d skipped\n", passed, failed, skipped))
os.exit(failed == 0 and passed > 0)
