#!/usr/bin/env bash
# Helpers shared by the launchers (sourced, not run). They read ROOT, PYTHON, WORKDIR and
# OVERRIDES and set run_names, run_flags, stage_list, name, point, workdir, extra for the caller.
# shellcheck disable=SC2034,SC2153

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

# Sets stage_list from a comma-separated --stage value (empty: the config's stage).
parse_stages() {
    IFS=',' read -r -a stage_list <<<"${1:-}"
    local s
    for s in "${stage_list[@]}"; do
        case "$s" in
            tokenizer | base | base_decoder | superres_tokenizer | superres | decoder) ;;
            *) die "--stage must be a comma-separated list of tokenizer, base, base_decoder, superres_tokenizer, superres, decoder; got '$1'" ;;
        esac
    done
}

# Sets run_names / run_flags: one run per sweep point, or a single unnamed run without a sweep.
# Extra arguments go to `python -m muse_jax.sweep` (e.g. --config=FILE to check the keys).
expand_runs() {
    local sweep="$1" point_name point_flags sweep_out
    shift
    run_names=()
    run_flags=()
    if [[ -z "$sweep" ]]; then
        run_names+=("")
        run_flags+=("")
        return
    fi
    [[ -f "$sweep" ]] || die "sweep file not found: $sweep"
    sweep_out="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m muse_jax.sweep "$sweep" "$@")"
    while IFS=$'\t' read -r point_name point_flags; do
        run_names+=("$point_name")
        run_flags+=("$point_flags")
    done <<<"$sweep_out"
}

has_override() {
    local key="$1" f
    shift
    for f in "${OVERRIDES[@]}" "$@"; do
        [[ "$f" == "$key="* ]] && return 0
    done
    return 1
}

# Sets name, point (the sweep point's overrides), workdir and extra for run $1: base-only sweep
# points share WORKDIR's tokenizer and dataset unless the point says otherwise.
run_args() {
    name="${run_names[$1]}"
    point=()
    eval "point=(${run_flags[$1]})" # Shell-quoted by muse_jax.sweep (shlex.join).
    workdir="$WORKDIR${name:+/$name}"
    extra=()
    if [[ -n "$name" && " ${stage_list[*]} " != *" tokenizer "* ]]; then
        has_override --config.tokenizer_workdir "${point[@]}" || extra+=(--config.tokenizer_workdir="$WORKDIR")
        has_override --config.data.data_dir "${point[@]}" || extra+=(--config.data.data_dir="$WORKDIR/data")
    fi
}
