-- busted output handler: the usual plain terminal output, then one closing line
-- "N passed, N failed" that CI reads, and the same counts appended to $XMPPSM_SUMMARY so
-- `make test` can add up several busted runs.
return function(options)
  local busted = require "busted"
  local handler = require "busted.outputHandlers.plainTerminal"(options)

  local function on_suite_end()
    local passed = handler.successesCount
    local failed = handler.failuresCount + handler.errorsCount
    local skipped = handler.pendingsCount
    io.write(string.format("%d passed, %d failed, %d skipped\n", passed, failed, skipped))
    io.flush()
    local path = os.getenv("XMPPSM_SUMMARY")
    if path and path ~= "" then
      local f = assert(io.open(path, "a"))
      f:write(string.format("%d %d %d\n", passed, failed, skipped))
      f:close()
    end
    return nil, true
  end

  busted.subscribe({ "suite", "end" }, on_suite_end)
  return handler
end
