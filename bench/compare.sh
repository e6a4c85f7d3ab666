#!/usr/bin/env bash
# The issue's name for the same-run A/B: `bench/compare.sh REV [SECONDS] [ROUNDS]` builds REV and
# the working tree and alternates them round by round (see bench/ab.sh, which does the work).
exec "$(dirname "$0")/ab.sh" "$@"
