# Filters `go test -v` output for a readable CI log: every package result,
# every skipped or failed test with the lines that say why (go prints them
# before the --- SKIP/FAIL line, so they are held until the test ends), build
# errors and panics; passing tests stay quiet. The full log is kept beside it.
/^(ok|FAIL|PASS|panic:|#)/            { print; held = ""; next }
/^=== (RUN|CONT|PAUSE|NAME)/          { held = ""; next }
/^ *--- PASS/                         { held = ""; next }
/^ *--- (SKIP|FAIL)/                  { printf "%s", held; print; held = ""; next }
/\.go:[0-9]+:[0-9]+: /                { print; next }
                                      { held = held $0 "\n" }
