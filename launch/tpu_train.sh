#!/usr/bin/env bash
# Trains a muse_jax stage on a Cloud TPU VM slice (every worker runs the same command).
# Run `launch/tpu_train.sh --help` for the flags; `--dry-run` prints the commands and runs nothing.
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || {
    echo "error: bash >= 4.4 is needed (this is $BASH_VERSION); on macOS: brew install bash" >&2
    exit 2
}

usage() {
    cat <<'EOF'
Usage: launch/tpu_train.sh --config=CONFIG --workdir=gs://BUCKET/DIR [options] [--config.a.b=VALUE ...]

Trains one or more stages of muse_jax on a Cloud TPU VM slice with gcloud:
  1. reuses the slice NAME if `gcloud compute tpus tpu-vm describe` finds it, else creates it
     (a PREEMPTED or TERMINATED slice is deleted and created again);
  2. installs the package on every worker: copies this checkout (or `git clone`s --repo) into
     ~/REMOTE_DIR and runs `pip install -e . 'jax[tpu]'` in the venv ~/muse_venv;
  3. runs `python -m muse_jax.train --config=CONFIG --workdir=WORKDIR [--config.stage=STAGE]
     [--config.a.b=VALUE ...]` on all workers at once (MUSE_DISTRIBUTED=1 makes the trainer call
     jax.distributed.initialize()), streaming their output here (and to --log-dir).
With --sweep, step 3 runs once per sweep point, in WORKDIR/<point-name>, one after the other.

Options (`--flag=value` or `--flag value`):
  --name=NAME              TPU VM name (default: muse-$USER)
  --zone=ZONE              zone (default: us-central2-b)
  --accelerator-type=TYPE  slice type, used when creating it (default: v4-8)
  --version=VERSION        TPU VM software version, used when creating it
                           (default: tpu-ubuntu2204-base)
  --project=PROJECT        GCP project (default: gcloud's configured project)
  --spot                   create the slice as a Spot VM
  --config=CONFIG          config file inside the repository, e.g. configs/shapes_tiny.py
                           (a `:arg` suffix is kept: configs/shapes_tiny.py:smoke)
  --workdir=gs://...       experiment directory; must be on GCS (shared by all workers)
  --stage=STAGE[,STAGE]    stages in order, from tokenizer, base, base_decoder,
                           superres_tokenizer, superres, decoder (e.g. tokenizer,base; default: the config's stage);
                           several stages run in that order; needed with --sweep
  --sweep=FILE             a sweep file (configs/sweeps/X.py, see muse_jax/sweep.py): one run per
                           point in WORKDIR/<point-name>. Base-only sweeps share WORKDIR's
                           tokenizer and data (--config.tokenizer_workdir=WORKDIR
                           --config.data.data_dir=WORKDIR/data) unless you set those keys.
  --repo=URL               git-clone URL on the workers instead of copying this checkout
  --ref=REF                branch or tag to clone with --repo (default: the remote's default)
  --remote-dir=DIR         checkout directory on the workers, under ~ (default: muse_jax)
  --remote-python=PY       Python >= 3.11 on the workers; apt-installed if missing
                           (default: python3.11)
  --skip-install           reuse the code and venv already on the workers
  --log-dir=DIR            also append each run's output to DIR/<run>.log here
  --delete-after           delete the slice when every run succeeded
  --restarts=N             when a command fails (a Spot slice was preempted, a worker rebooted),
                           start again from step 1 up to N times, 60 s apart: the slice is
                           recreated if needed and every stage resumes from its last checkpoint
                           in WORKDIR (a finished stage returns at once). Default: 0
  --dry-run                print every command, one per line, shell-quoted; run nothing
  -h, --help               this help
  --config.a.b=VALUE       config overrides, passed to every run (sweep points come after them)

Example:
  launch/tpu_train.sh --name=muse-v4 --config=configs/shapes_tiny.py \
      --workdir=gs://my-bucket/muse/shapes --stage=tokenizer,base --config.base.train.num_steps=5000
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

NAME="muse-${USER:-user}"
ZONE="us-central2-b"
ACCELERATOR_TYPE="v4-8"
VERSION="tpu-ubuntu2204-base"
PROJECT=""
SPOT=0
CONFIG=""
WORKDIR=""
STAGES=""
SWEEP=""
REPO=""
REF=""
REMOTE_DIR="muse_jax"
REMOTE_PYTHON="python3.11"
REMOTE_VENV="muse_venv"
SKIP_INSTALL=0
LOG_DIR=""
DELETE_AFTER=0
DRY_RUN=0
RESTARTS=0
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
        --dry-run | --spot | --skip-install | --delete-after)
            ((has_value)) && die "$key takes no value"
            case "$key" in
                --dry-run) DRY_RUN=1 ;;
                --spot) SPOT=1 ;;
                --skip-install) SKIP_INSTALL=1 ;;
                --delete-after) DELETE_AFTER=1 ;;
            esac
            ;;
        --config.*)
            if ((!has_value)); then
                (($#)) || die "$key needs a value"
                value="$1"
                shift
            fi
            OVERRIDES+=("$key=$value")
            ;;
        --name | --zone | --accelerator-type | --version | --project | --config | --workdir | \
            --stage | --sweep | --repo | --ref | --remote-dir | --remote-python | --log-dir | --restarts)
            if ((!has_value)); then
                (($#)) || die "$key needs a value"
                value="$1"
                shift
            fi
            [[ -n "$value" ]] || die "$key is empty"
            case "$key" in
                --name) NAME="$value" ;;
                --zone) ZONE="$value" ;;
                --accelerator-type) ACCELERATOR_TYPE="$value" ;;
                --version) VERSION="$value" ;;
                --project) PROJECT="$value" ;;
                --config) CONFIG="$value" ;;
                --workdir) WORKDIR="$value" ;;
                --stage) STAGES="$value" ;;
                --sweep) SWEEP="$value" ;;
                --repo) REPO="$value" ;;
                --ref) REF="$value" ;;
                --remote-dir) REMOTE_DIR="$value" ;;
                --remote-python) REMOTE_PYTHON="$value" ;;
                --log-dir) LOG_DIR="$value" ;;
                --restarts) RESTARTS="$value" ;;
            esac
            ;;
        *) die "unknown argument '$arg' (see launch/tpu_train.sh --help)" ;;
    esac
done

[[ -n "$CONFIG" ]] || die "--config is required (see --help)"
[[ "$RESTARTS" =~ ^[0-9]+$ ]] || die "--restarts must be a whole number, got '$RESTARTS'"
[[ -n "$WORKDIR" ]] || die "--workdir is required (see --help)"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path that every TPU worker can reach, got '$WORKDIR'"
[[ -z "$SWEEP" || -n "$STAGES" ]] || die "--sweep needs --stage (base-only sweeps share WORKDIR's tokenizer)"
[[ -z "$REF" || -n "$REPO" ]] || die "--ref needs --repo"
[[ "$REMOTE_DIR" != /* && "$REMOTE_DIR" != *..* ]] || die "--remote-dir must be relative to ~ on the workers"
WORKDIR="${WORKDIR%/}"

# The config path as the workers see it: relative to the repository root.
config_file="${CONFIG%%:*}"
config_arg="${CONFIG:${#config_file}}"
if [[ -f "$config_file" ]]; then
    abs="$(cd "$(dirname "$config_file")" && pwd)/$(basename "$config_file")"
    [[ "$abs" == "$ROOT"/* ]] || die "--config must be inside the repository ($ROOT): it is run on the workers"
    CONFIG="${abs#"$ROOT"/}$config_arg"
elif [[ -f "$ROOT/$config_file" ]]; then
    :
elif [[ -z "$REPO" ]]; then
    die "config file not found: $config_file"
fi

parse_stages "$STAGES"

# Runs: names and their overrides (one run without --sweep).
expand_runs "$SWEEP"

LINES=()
add() { LINES+=("$1"); }

gcloud_common=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && gcloud_common+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

# 1. The slice.
create=("${tpu[@]}" create "$NAME" "${gcloud_common[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
((SPOT)) && create+=(--spot)
delete=("${tpu[@]}" delete "$NAME" "${gcloud_common[@]}" --quiet)
add "state=\"\$($(qjoin "${tpu[@]}" describe "$NAME" "${gcloud_common[@]}" --format='value(state)') 2>/dev/null)\" || $(qjoin "${create[@]}"); case \"\$state\" in PREEMPTED | TERMINATED) $(qjoin "${delete[@]}") && $(qjoin "${create[@]}") ;; esac"

# 2. The code and its environment on every worker.
remote_home_dir="\"\$HOME\"/$(q "$REMOTE_DIR")"
remote_venv="\"\$HOME\"/$(q "$REMOTE_VENV")"
if ((!SKIP_INSTALL)); then
    if [[ -n "$REPO" ]]; then
        clone=(git clone --depth=1)
        [[ -n "$REF" ]] && clone+=(--branch="$REF")
        fetch_code="rm -rf $remote_home_dir && $(qjoin "${clone[@]}" "$REPO") $remote_home_dir"
    else
        tarball="${TMPDIR:-/tmp}/muse_jax_src_${NAME}.tgz"
        remote_tarball="/tmp/muse_jax_src.tgz"
        if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
            add "git -C $(q "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$tarball") -C $(q "$ROOT") --null -T -"
        else
            add "tar -czf $(q "$tarball") -C $(q "$ROOT") --exclude=.git --exclude=runs --exclude=__pycache__ ."
        fi
        add "$(qjoin "${tpu[@]}" scp "$tarball" "$NAME:$remote_tarball" "${gcloud_common[@]}" --worker=all)"
        fetch_code="rm -rf $remote_home_dir && mkdir -p $remote_home_dir && tar -xzf $(q "$remote_tarball") -C $remote_home_dir"
    fi
    py="$(q "$REMOTE_PYTHON")"
    install="set -e; $fetch_code; command -v $py >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv; }; [ -x $remote_venv/bin/python ] || $py -m venv $remote_venv; $remote_venv/bin/pip install -q -U pip; cd $remote_home_dir && $remote_venv/bin/pip install -q -e . 'jax[tpu]'"
    add "$(qjoin "${tpu[@]}" ssh "$NAME" "${gcloud_common[@]}" --worker=all --command "$install")"
fi

# 3. The runs, one after the other.
[[ -n "$LOG_DIR" ]] && add "mkdir -p $(q "$LOG_DIR")"
for i in "${!run_names[@]}"; do
    run_args "$i"
    for stage in "${stage_list[@]:-}"; do
        args=(--config="$CONFIG" --workdir="$workdir")
        [[ -n "$stage" ]] && args+=(--config.stage="$stage")
        args+=("${OVERRIDES[@]}" "${point[@]}" "${extra[@]}")
        train="cd $remote_home_dir && MUSE_DISTRIBUTED=1 $remote_venv/bin/python -m muse_jax.train $(qjoin "${args[@]}")"
        line="$(qjoin "${tpu[@]}" ssh "$NAME" "${gcloud_common[@]}" --worker=all --command "$train")"
        [[ -n "$LOG_DIR" ]] && line+=" 2>&1 | tee -a $(q "$LOG_DIR/${name:-train}.log")"
        add "$line"
    done
done

((DELETE_AFTER)) && add "$(qjoin "${tpu[@]}" delete "$NAME" "${gcloud_common[@]}" --quiet)"

if ((DRY_RUN)); then
    printf '%s\n' "${LINES[@]}"
    exit 0
fi

command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use --dry-run"
attempt=0
while :; do
    failed=0
    for line in "${LINES[@]}"; do
        echo "+ $line" >&2
        bash -o pipefail -c "$line" || {
            failed=$?
            break
        }
    done
    ((failed)) || exit 0
    ((attempt < RESTARTS)) || exit "$failed"
    attempt=$((attempt + 1))
    delay="${MUSE_RESTART_DELAY_S:-60}"
    echo "tpu_train.sh: a command failed (exit $failed); restart $attempt of $RESTARTS in ${delay} s" >&2
    sleep "$delay"
done
