#!/usr/bin/env bash
# Trains a muse_jax stage on this machine: the same entry point and flags as launch/tpu_train.sh.
# Run `launch/local_train.sh --help` for the flags; `--dry-run` prints the commands and runs nothing.
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || {
    echo "error: bash >= 4.4 is needed (this is $BASH_VERSION); on macOS: brew install bash" >&2
    exit 2
}

usage() {
    cat <<'EOF'
Usage: launch/local_train.sh --config=CONFIG --workdir=DIR [options] [--config.a.b=VALUE ...]

Runs `$PYTHON -m muse_jax.train --config=CONFIG --workdir=DIR [--config.stage=STAGE]
[--config.a.b=VALUE ...]` here (PYTHON defaults to python3; install the package first with
`pip install -e .`). With --sweep, it runs once per sweep point, in DIR/<point-name>, one after
the other, and stops at the first run that fails.

Options (`--flag=value` or `--flag value`):
  --config=CONFIG          config file, e.g. configs/shapes_tiny.py (or configs/shapes_tiny.py:smoke)
  --workdir=DIR            experiment directory
  --stage=STAGE[,STAGE]    stages in order, from tokenizer, base, base_decoder,
                           superres_tokenizer, superres, decoder (e.g. tokenizer,base; default: the config's stage);
                           several stages run in that order; needed with --sweep
  --sweep=FILE             a sweep file (configs/sweeps/X.py, see muse_jax/sweep.py): one run per
                           point in DIR/<point-name>; its keys are checked against CONFIG first.
                           Base-only sweeps share DIR's tokenizer and data
                           (--config.tokenizer_workdir=DIR --config.data.data_dir=DIR/data)
                           unless you set those keys.
  --log-dir=DIR            also append each run's output to DIR/<run>.log
  --dry-run                print every command, one per line, shell-quoted; run nothing
  -h, --help               this help
  --config.a.b=VALUE       config overrides, passed to every run (sweep points come after them)

Example (the embedded default: one tokenizer, then six base runs):
  launch/local_train.sh --config=configs/shapes_tiny.py --workdir=runs/sweep --stage=tokenizer
  launch/local_train.sh --config=configs/shapes_tiny.py --workdir=runs/sweep --stage=base \
      --sweep=configs/sweeps/shapes_lr.py --log-dir=runs/sweep/logs
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

CONFIG=""
WORKDIR=""
STAGES=""
SWEEP=""
LOG_DIR=""
DRY_RUN=0
OVERRIDES=()

while (($#)); do
    arg="$1"
    shift
    if [[ "$arg" == --*=* ]]; then
        key="${arg%%=*}"
        value="${arg#*=}"
        has_value=1
    else
        key="$arg"
        value=""
        has_value=0
    fi
    case "$key" in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run)
            ((has_value)) && die "$key takes no value"
            DRY_RUN=1
            ;;
        --config.*)
            if ((!has_value)); then
                (($#)) || die "$key needs a value"
                value="$1"
                shift
            fi
            OVERRIDES+=("$key=$value")
            ;;
        --config | --workdir | --stage | --sweep | --log-dir)
            if ((!has_value)); then
                (($#)) || die "$key needs a value"
                value="$1"
                shift
            fi
            [[ -n "$value" ]] || die "$key is empty"
            case "$key" in
                --config) CONFIG="$value" ;;
                --workdir) WORKDIR="$value" ;;
                --stage) STAGES="$value" ;;
                --sweep) SWEEP="$value" ;;
                --log-dir) LOG_DIR="$value" ;;
            esac
            ;;
        *) die "unknown argument '$arg' (see launch/local_train.sh --help)" ;;
    esac
done

[[ -n "$CONFIG" ]] || die "--config is required (see --help)"
[[ -n "$WORKDIR" ]] || die "--workdir is required (see --help)"
[[ -z "$SWEEP" || -n "$STAGES" ]] || die "--sweep needs --stage (base-only sweeps share WORKDIR's tokenizer)"
[[ -f "${CONFIG%%:*}" ]] || die "config file not found: ${CONFIG%%:*}"
[[ "$WORKDIR" == / ]] || WORKDIR="${WORKDIR%/}"

parse_stages "$STAGES"

# Runs: names and their overrides (one run without --sweep).
expand_runs "$SWEEP" --config="${CONFIG%%:*}"

LINES=()
[[ -n "$LOG_DIR" ]] && LINES+=("mkdir -p $(q "$LOG_DIR")")
for i in "${!run_names[@]}"; do
    run_args "$i"
    for stage in "${stage_list[@]:-}"; do
        args=("$PYTHON" -m muse_jax.train --config="$CONFIG" --workdir="$workdir")
        [[ -n "$stage" ]] && args+=(--config.stage="$stage")
        args+=("${OVERRIDES[@]}" "${point[@]}" "${extra[@]}")
        line="$(qjoin "${args[@]}")"
        [[ -n "$LOG_DIR" ]] && line+=" 2>&1 | tee -a $(q "$LOG_DIR/${name:-train}.log")"
        LINES+=("$line")
    done
done

if ((DRY_RUN)); then
    printf '%s\n' "${LINES[@]}"
    exit 0
fi

for line in "${LINES[@]}"; do
    echo "+ $line" >&2
    bash -o pipefail -c "$line"
done
