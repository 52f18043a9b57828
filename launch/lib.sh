#!/usr/bin/env bash
# Helpers shared by the launchers (sourced, not run).

die() {
    echo "error: $*" >&2
    exit 2
}

# Quotes one word for a POSIX shell, like Python's shlex.quote.
q() {
    local s="$1" unsafe='[^A-Za-z0-9_@%+=:,./-]'
    if [[ -n "$s" && ! "$s" =~ $unsafe ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/\'\"\'\"\'}"
    fi
}

# Quotes and joins words.
qjoin() {
    local out="" w
    for w in "$@"; do
        out+="${out:+ }$(q "$w")"
    done
    printf '%s' "$out"
}
