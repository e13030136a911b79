"""tpu_scripts/: static checks of every script, their --dry-run output against the gcloud commands written
out by hand from gcloud's reference (`gcloud compute tpus tpu-vm create|ssh|scp|delete`,
`gcloud [alpha] compute tpus queued-resources create|delete`), the remote command lines executed for real
in a fake home folder, the paper recipe's command list, both recipes run for real with TINY=1 (slow), and the
Colab notebook."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
RECIPE = SCRIPTS / "recipes" / "paper_mistral7b.sh"
SMOLLM2_RECIPE = SCRIPTS / "recipes" / "paper_smollm2_cpu.sh"
NOTEBOOK = SCRIPTS / "colab_tpu.ipynb"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHELL_FILES = sorted(SCRIPTS.rglob("*.sh"))

PROJECT, TPU, BUCKET = "my-proj", "needles-test", "gs://my-bucket"
CKPT = f"{BUCKET}/needles/paper_mistral7b/runs"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", TPU]
SCP = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]


def loc(zone: str) -> list[str]:
    return [f"--project={PROJECT}", f"--zone={zone}"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file of our own, so that edits to tpu_scripts/config.sh cannot change the tests."""
    path = tmp_path / "test-config.sh"
    text = (SCRIPTS / "config.sh").read_text()
    path.write_text(text + f'\nPROJECT={PROJECT}\nTPU_NAME={TPU}\n: "${{BUCKET:={BUCKET}}}"\n')
    return path


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}
    env.update(extra)
    return env


def sh(script: Path | str, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def dry(tmp_path: Path, config: Path, script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands a script prints under --dry-run, each split the way a POSIX shell would."""
    proc = sh(SCRIPTS / script, "--dry-run", "--config", str(config), *args, env=clean_env(tmp_path, **env))
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote_command(cmd: list[str]) -> str:
    (value,) = [a.removeprefix("--command=") for a in cmd if a.startswith("--command=")]
    return value


# ---------------------------------------------------------------- static checks


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_shell_scripts_are_clean(path: Path):
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    else:  # Debian/Ubuntu: apt-get install shellcheck
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = path.read_text()
    if os.access(path, os.X_OK):
        assert text.startswith("#!/usr/bin/env bash\n"), "executable scripts start with the bash shebang"
        assert "\nset -euo pipefail\n" in text


def test_expected_scripts_exist_and_document_themselves(tmp_path: Path):
    for name in ["create", "setup", "run", "status", "ssh", "copy_out", "delete"]:
        proc = sh(SCRIPTS / f"{name}.sh", "--help", env=clean_env(tmp_path))
        assert "Usage: tpu_scripts/" in proc.stdout and "--dry-run" in proc.stdout, name
    assert "Usage:" in sh(RECIPE, "--help", env=clean_env(tmp_path)).stdout


def test_hosts_per_accelerator_type(tmp_path: Path):
    # Google's tables: v5e/v6e slices above 8 chips have 4 chips per host; v4/v5p names count TensorCores
    # (2 per chip, 4 chips = one host); v2/v3 have 8 cores per host.
    expected = {"v5litepod-1": 1, "v5litepod-8": 1, "v5litepod-16": 4, "v5litepod-256": 64, "v6e-8": 1,
                "v6e-16": 4, "v4-8": 1, "v4-32": 4, "v4-128": 16, "v5p-8": 1, "v5p-16": 2, "v3-32": 4}
    script = f"source {shlex.quote(str(SCRIPTS / 'lib.sh'))}; for t in {' '.join(expected)}; do num_hosts $t; done"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert dict(zip(expected, map(int, out))) == expected


# ---------------------------------------------------------------- create / delete


def test_create_v5e8_on_demand_spot_preemptible(tmp_path, config):
    base = ["gcloud", "compute", "tpus", "tpu-vm", "create", TPU, *loc("us-west4-a"),
            "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]
    assert dry(tmp_path, config, "create.sh") == [base]
    assert dry(tmp_path, config, "create.sh", "--spot") == [base + ["--spot"]]
    assert dry(tmp_path, config, "create.sh", PROVISIONING="preemptible") == [base + ["--preemptible"]]
    # the accelerator-type spelling users know from the AOT tool is accepted
    assert dry(tmp_path, config, "create.sh", ACCELERATOR_TYPE="v5e-8") == [base]


def test_create_v4_32_and_queued_variants(tmp_path, config):
    env = dict(ACCELERATOR_TYPE="v4-32", ZONE="us-central2-b")
    assert dry(tmp_path, config, "create.sh", **env) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", TPU, *loc("us-central2-b"),
         "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
    queued = ["compute", "tpus", "queued-resources", "create", f"{TPU}-qr", *loc("us-central2-b"),
              "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", f"--node-id={TPU}"]
    assert dry(tmp_path, config, "create.sh", "--queued", **env) == [["gcloud", *queued]]
    assert dry(tmp_path, config, "create.sh", "--queued", "--spot", **env) == [["gcloud", *queued, "--spot"]]
    # --best-effort exists only in gcloud's alpha track
    assert dry(tmp_path, config, "create.sh", "--queued", "--best-effort", **env) == [
        ["gcloud", "alpha", *queued, "--best-effort"]]
    assert dry(tmp_path, config, "create.sh", QUEUED="1", PROVISIONING="reserved", RUNTIME_VERSION="v2-alpha-tpuv4",
               **env) == [["gcloud", *[a.replace("tpu-ubuntu2204-base", "v2-alpha-tpuv4") for a in queued],
                           "--reserved"]]


@pytest.mark.parametrize("args, message", [
    (["--queued", "--preemptible"], "queued resources take --spot"),
    (["--best-effort"], "needs a queued resource"),
])
def test_create_refuses_impossible_combinations(tmp_path, config, args, message):
    proc = sh(SCRIPTS / "create.sh", "--dry-run", "--config", str(config), *args, env=clean_env(tmp_path), check=False)
    assert proc.returncode != 0 and message in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATOR_TYPE": "v9x-8"}, "unknown TPU generation"),
    ({"ACCELERATOR_TYPE": "v5litepod"}, "unknown ACCELERATOR_TYPE"),
    ({"PROJECT": ""}, "PROJECT is not set"),
    ({"PROVISIONING": "cheap"}, "PROVISIONING must be"),
])
def test_bad_configuration_is_named(tmp_path, config, env, message):
    if env.get("PROJECT") == "":
        config.write_text(config.read_text().replace(f"PROJECT={PROJECT}", "PROJECT="))
    proc = sh(SCRIPTS / "create.sh", "--dry-run", "--config", str(config), env=clean_env(tmp_path, **env), check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_missing_config_file_is_named(tmp_path):
    proc = sh(SCRIPTS / "create.sh", "--config", str(tmp_path / "nope.sh"), env=clean_env(tmp_path), check=False)
    assert proc.returncode != 0 and "nope.sh" in proc.stderr


def test_delete_plain_and_queued(tmp_path, config):
    assert dry(tmp_path, config, "delete.sh") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", TPU, *loc("us-west4-a")]]
    assert dry(tmp_path, config, "delete.sh", "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", f"{TPU}-qr", *loc("us-west4-a"), "--force"]]


# ---------------------------------------------------------------- setup


def test_setup_ships_code_and_installs_on_every_worker(tmp_path, config):
    cmds = dry(tmp_path, config, "setup.sh", ACCELERATOR_TYPE="v4-32", ZONE="us-central2-b",
               WEIGHTS_SRC="gs://my-bucket/weights/Mistral-7B-Instruct-v0.1/", EVAL_DATA_SRC=str(tmp_path / "eval"))
    tarball = str(tmp_path / f"needles-src-{TPU}.tar.gz")
    assert cmds[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert cmds[1] == [*SCP, tarball, f"{TPU}:needles-src.tar.gz", *loc("us-central2-b"), "--worker=all"]
    assert cmds[2][:-1] == [*SSH, *loc("us-central2-b"), "--worker=all"]
    remote = shlex.split(remote_command(cmds[2]))
    assert remote[:9] == ["mkdir", "-p", "needles", "&&", "tar", "-xzf", "needles-src.tar.gz", "-C", "needles"]
    # gs:// sources are fetched by the workers; the local evaluation data is copied from here
    assert remote[10:] == ["env", "PYTHON_VERSION=3.11", "WEIGHTS_SRC=gs://my-bucket/weights/Mistral-7B-Instruct-v0.1/",
                           "EVAL_DATA_SRC=", "bash", "needles/tpu_scripts/remote/setup_worker.sh"]
    assert cmds[3] == [*SCP, "--recurse", str(tmp_path / "eval"), f"{TPU}:eval_data/", *loc("us-central2-b"),
                       "--worker=all"]
    assert len(cmds) == 4


def test_setup_never_prints_the_hub_token(tmp_path, config):
    cmds = dry(tmp_path, config, "setup.sh", WEIGHTS_SRC="hf:mistralai/Mistral-7B-Instruct-v0.1",
               HF_TOKEN="hf_secret123")
    assert "hf_secret123" not in str(cmds)
    remote = shlex.split(remote_command(cmds[2]))
    assert "WEIGHTS_SRC=hf:mistralai/Mistral-7B-Instruct-v0.1" in remote and "HF_TOKEN=<hidden>" in remote


# ---------------------------------------------------------------- run / status / ssh / copy-out


def test_run_v5e8_runs_the_recipe_on_all_workers(tmp_path, config):
    (cmd,) = dry(tmp_path, config, "run.sh")
    assert cmd[:-1] == [*SSH, *loc("us-west4-a"), "--worker=all"]
    remote = remote_command(cmd)
    assert f"CKPT_ROOT={CKPT}" in remote and "RUN_NAME=paper_mistral7b" in remote
    assert "{ bash tpu_scripts/recipes/paper_mistral7b.sh ; } 2>&1 | tee ~/needles_logs/run.log" in remote


def test_run_v4_32_same_command_everywhere_with_per_host_logs(tmp_path, config):
    train = ("python -m jaxtrain train --model mistral-7b-instruct-v0.1 --init-from '$BASE_MODEL' "
             "--data '$WORK/shards/template-seed0' --out '$CKPT_ROOT/template-seed0' --resume")
    log_dir = str(tmp_path / "logs")
    cmds = dry(tmp_path, config, "run.sh", "--label", "train", "--", *shlex.split(train),
               ACCELERATOR_TYPE="v4-32", ZONE="us-central2-b", WEIGHTS_SRC="gs://b/w/Mistral-7B-Instruct-v0.1",
               LOG_DIR=log_dir)
    assert cmds[0] == ["mkdir", "-p", log_dir]
    assert cmds[1][:-2] == [*SSH, *loc("us-central2-b"), "--worker=all"]
    assert cmds[1][-1] == f"--output-directory={log_dir}"
    remote = remote_command(cmds[1])
    assert 'BASE_MODEL="$HOME/weights/Mistral-7B-Instruct-v0.1"' in remote
    assert "python -m jaxtrain train --model mistral-7b-instruct-v0.1 --init-from $BASE_MODEL" in remote
    assert "--out $CKPT_ROOT/template-seed0 --resume ; } 2>&1 | tee ~/needles_logs/train.log" in remote


def test_run_on_a_pod_needs_shared_checkpoints(tmp_path, config):
    config.write_text(config.read_text().replace(BUCKET, ""))
    proc = sh(SCRIPTS / "run.sh", "--dry-run", "--config", str(config),
              env=clean_env(tmp_path, ACCELERATOR_TYPE="v4-32"), check=False)
    assert proc.returncode != 0 and "4 hosts" in proc.stderr and "gs://" in proc.stderr


def fake_worker_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "needles").mkdir(parents=True)
    return home


def test_run_remote_command_really_runs_with_the_environment(tmp_path, config):
    """Execute the --command line a worker would get, in a fake home: quoting, env, cwd and log are right."""
    probe = "echo \"$PWD|$CKPT_ROOT|$BASE_MODEL|$EVAL_DATA|$WORK|$RUN_NAME|$EXTRA\" && echo 'it'\"'\"'s'"
    (cmd,) = dry(tmp_path, config, "run.sh", "--", probe, WEIGHTS_SRC="/local/Mistral-7B-Instruct-v0.1",
                 EVAL_DATA_SRC="gs://b/eval_data/", REMOTE_ENV="EXTRA=a=b")
    home = fake_worker_home(tmp_path)
    out = subprocess.run(["bash", "-c", remote_command(cmd)], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "HOME": str(home)}).stdout
    want = (f"{home}/needles|{CKPT}|{home}/weights/Mistral-7B-Instruct-v0.1|{home}/eval_data/eval_data|"
            f"{home}/needles_work|paper_mistral7b|a=b\nit's\n")
    assert out == want
    assert (home / "needles_logs" / "run.log").read_text() == want


def test_run_detached_remote_command_survives_in_the_background(tmp_path, config):
    (cmd,) = dry(tmp_path, config, "run.sh", "--detach", "--label", "bg", "--", "sleep 0.2; echo \"done $RUN_NAME\"")
    home = fake_worker_home(tmp_path)
    proc = subprocess.run(["bash", "-c", remote_command(cmd)], capture_output=True, text=True, check=True,
                          env={"PATH": os.environ["PATH"], "HOME": str(home)}, timeout=10)
    assert proc.stdout.startswith("started on ")
    log = home / "needles_logs" / "bg.log"
    for _ in range(100):
        if log.exists() and log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text() == "done paper_mistral7b\n"


def test_status_ssh_copy_out(tmp_path, config):
    status = dry(tmp_path, config, "status.sh", "--queued", "--lines", "3")
    assert status[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{TPU}-qr",
                         *loc("us-west4-a"), "--format=yaml(state)"]
    assert status[1][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", TPU, *loc("us-west4-a")[:1]]
    assert status[2][:-1] == [*SSH, *loc("us-west4-a"), "--worker=all"] and "tail -n 3" in status[2][-1]

    assert dry(tmp_path, config, "ssh.sh", "--worker", "2") == [[*SSH, *loc("us-west4-a"), "--worker=2"]]
    assert dry(tmp_path, config, "ssh.sh", "--worker=all", "--", "ls", "-la") == [
        [*SSH, *loc("us-west4-a"), "--worker=all", "--command=ls -la"]]

    out = dry(tmp_path, config, "copy_out.sh", "--models", "--local", str(tmp_path / "res"))
    dest = f"{BUCKET}/needles/paper_mistral7b"
    assert out[0] == [*SSH, *loc("us-west4-a"), "--worker=0",
                      f"--command=gcloud storage rsync --recursive ~/needles_work/results {dest}/results && "
                      f"gcloud storage rsync --recursive ~/needles_work/hf {dest}/hf"]
    assert out[1] == [*SSH, *loc("us-west4-a"), "--worker=all",
                      f"--command=gcloud storage rsync --recursive ~/needles_logs {dest}/logs/$(hostname)"]
    assert out[2] == ["mkdir", "-p", str(tmp_path / "res")]
    assert out[3] == [*SCP, "--recurse", f"{TPU}:needles_work/results", str(tmp_path / "res"),
                      *loc("us-west4-a"), "--worker=0"]


# ---------------------------------------------------------------- the paper recipe


def recipe_commands(tmp_path: Path, recipe: Path = RECIPE, **env: str) -> list[list[str]]:
    proc = sh(recipe, "--dry-run", env=clean_env(tmp_path, **env))
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_recipe_is_the_paper_experiment(tmp_path):
    work, base, data = "/w", "/m/Mistral-7B-Instruct-v0.1", "/d"
    cmds = recipe_commands(tmp_path, WORK=work, BASE_MODEL=base, EVAL_DATA=data, CKPT_ROOT=CKPT + "/")
    runs = [f"{v}-seed{s}" for s in (0, 1, 2) for v in ("template", "notemplate")]
    py = ["python3", "-m"]
    gens = [c for c in cmds if c[:4] == [*py, "data_gen", "generate"]]
    assert gens == [[*py, "data_gen", "generate", "--preset", "paper-simple", "--seed", str(s),
                     *(["--template"] if v == "template" else []), "--overwrite", "--out", f"{work}/data/{v}-seed{s}"]
                    for s in (0, 1, 2) for v in ("template", "notemplate")]
    trains = [c for c in cmds if c[:4] == [*py, "jaxtrain", "train"]]
    # the training seed is the data set's: the grid's seeds vary the batch order along with the data
    assert trains == [[*py, "jaxtrain", "train", "--model", "mistral-7b-instruct-v0.1", "--init-from", base,
                       "--data", f"{work}/shards/{r}", "--out", f"{CKPT}/{r}", "--epochs", "2", "--lr", "5e-6",
                       "--global-batch", "16", "--grad-accum", "1", "--seed", r[-1], "--resume", "--remat",
                       "offload_input", "--offload-state"]
                      for r in runs]
    exports = [c for c in cmds if c[:4] == [*py, "jaxtrain", "export"]]
    assert exports == [[*py, "jaxtrain", "export", "--checkpoint", f"{CKPT}/{r}", "--out", f"{work}/hf/{r}",
                        "--dtype", "bfloat16"] for r in runs]
    evals = [c for c in cmds if c[:3] == [*py, "eval"] and c[3] != "compare"]
    general = ["mdqa", "mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open"]
    # before: 6 tasks + the synthetic eval of each of the 6 data sets; after: 6 tasks + its own data set
    assert len(evals) == (6 + 6) + 6 * (6 + 1)
    assert [*py, "eval", "mdqa", "--model", base, "--data-dir", "/d/mdqa", "--label", "base", "--out",
            f"{work}/results/base/mdqa", "--dtype", "bfloat16", "--shard"] in evals
    assert [*py, "eval", "nq_open", "--model", f"{work}/hf/notemplate-seed2", "--data-dir", "/d/nq_open", "--label",
            "notemplate-seed2", "--out", f"{work}/results/notemplate-seed2/nq_open", "--dtype", "bfloat16", "--shard"] in evals
    assert [*py, "eval", "synthetic", "--model", f"{work}/hf/template-seed1", "--data-file",
            f"{work}/data/template-seed1/eval.jsonl", "--label", "template-seed1", "--out",
            f"{work}/results/template-seed1/synthetic-template-seed1", "--dtype", "bfloat16", "--shard"] in evals
    # every finetuned model is evaluated only after its export, which follows its training
    for r in runs:
        i_train = cmds.index(trains[runs.index(r)])
        i_export = cmds.index(exports[runs.index(r)])
        i_evals = [i for i, c in enumerate(cmds) if f"{work}/hf/{r}" in c and c[:3] == [*py, "eval"]]
        assert i_train < i_export < min(i_evals) and len(i_evals) == 7
        # a half-written export or shard folder from an interrupted attempt is cleared first
        assert cmds[i_export - 1] == ["rm", "-rf", f"{work}/hf/{r}"]
        assert cmds[cmds.index([*py, "data_gen", "shards", "--input", f"{work}/data/{r}/train.jsonl", "--out",
                                f"{work}/shards/{r}"]) - 1] == ["rm", "-rf", f"{work}/shards/{r}"]
    # each compare: (results files, their labels): a run's label is its variant, so its seeds form one column
    compares = {c[c.index("--out") + 1]: (c[4:c.index("--labels")], c[c.index("--labels") + 1:c.index("--out")])
                for c in cmds if c[:4] == [*py, "eval", "compare"]}
    assert compares[f"{work}/results/compare/mdqa"] == (
        [f"{work}/results/{m}/mdqa/results.json" for m in ["base", *runs]],
        ["base", *(["template", "notemplate"] * 3)])
    assert compares[f"{work}/results/compare/synthetic-notemplate-seed1"] == (
        [f"{work}/results/{m}/synthetic-notemplate-seed1/results.json" for m in ["base", "notemplate-seed1"]],
        ["base", "notemplate"])
    # each variant's synthetic samples over its seeds: the base model on each seed's data set, then the runs
    assert compares[f"{work}/results/compare/synthetic-template"] == (
        [f"{work}/results/base/synthetic-template-seed{s}/results.json" for s in (0, 1, 2)]
        + [f"{work}/results/template-seed{s}/synthetic-template-seed{s}/results.json" for s in (0, 1, 2)],
        ["base"] * 3 + ["template"] * 3)
    assert len(compares) == len(general) + len(runs) + 2


def test_recipe_tiny_mode_is_the_same_steps_on_cpu_scale(tmp_path):
    work = str(tmp_path / "w")
    cmds = recipe_commands(tmp_path, TINY="1", WORK=work, EVAL_DATA="/d", PYTHON="/venv/python")
    assert cmds[0] == ["/venv/python", "-m", "data_gen", "generate", "--preset", "demo-simple", "--seed", "0",
                       "--template", "--overwrite", "--out", f"{work}/data/template-seed0"]
    assert ["/venv/python", str(SCRIPTS / "recipes" / "make_tiny_base.py"), "--preset", "tiny",
            "--out", f"{work}/base-tiny"] in cmds
    assert ["/venv/python", "-m", "jaxtrain", "train", "--model", "tiny", "--init-from", f"{work}/base-tiny",
            "--data", f"{work}/shards/template-seed0", "--out", f"{work}/runs/template-seed0", "--epochs", "2",
            "--lr", "1e-3", "--global-batch", "16", "--grad-accum", "1", "--seed", "0", "--resume"] in cmds
    evals = [c for c in cmds if c[1:3] == ["-m", "eval"] and c[3] != "compare"]
    assert len(evals) == 2 * 7 and all(c[c.index("--limit") + 1] == "2" for c in evals)
    assert not any("synthetic-template" == c[-1].rsplit("/", 1)[-1] for c in cmds)  # one seed: no seeds' table


def test_recipe_lora_on_one_chip(tmp_path):
    """LORA_RANK > 0 (Colab's v5e-1): adapters on the frozen base, LoRA's learning rate, the base-model flags
    of docs/lora.md, the global batch of 16 as 16 micro-batches of one row (what fits one chip) unless
    GRAD_ACCUM says otherwise; the run itself evaluated (adapters unmerged on the recipe's base) with the base
    in the dtype it trained in, the base model in that dtype too, one prompt at a time; the merged export last,
    in EXPORT_DTYPE like a full finetune's."""
    work, base = "/w", "/m/Mistral-7B-Instruct-v0.1"
    run = f"{work}/runs/template-seed0"
    cmds = recipe_commands(tmp_path, WORK=work, BASE_MODEL=base, EVAL_DATA="/d", SEEDS="0", VARIANTS="template",
                           TASKS="mdqa synthetic", LORA_RANK="16")
    py = ["python3", "-m"]
    (train,) = [c for c in cmds if c[:4] == [*py, "jaxtrain", "train"]]
    assert train == [*py, "jaxtrain", "train", "--model", "mistral-7b-instruct-v0.1", "--init-from", base, "--data",
                     f"{work}/shards/template-seed0", "--out", run, "--epochs", "2",
                     "--lr", "2e-4", "--global-batch", "16", "--grad-accum", "16", "--seed", "0", "--resume",
                     "--lora-rank", "16", "--base-dtype", "int8", "--remat", "offload_input"]
    synthetic = ["--data-file", f"{work}/data/template-seed0/eval.jsonl"]
    int8 = ["--base-dtype", "int8"]
    evals = [[*py, "eval", "mdqa", "--model", base, *int8, "--data-dir", "/d/mdqa", "--label", "base", "--out",
              f"{work}/results/base/mdqa", "--batch-size", "1"],
             [*py, "eval", "synthetic", "--model", base, *int8, *synthetic, "--label", "base", "--out",
              f"{work}/results/base/synthetic-template-seed0", "--batch-size", "1"],
             [*py, "eval", "mdqa", "--model", run, "--base", base, *int8, "--data-dir", "/d/mdqa", "--label",
              "template-seed0", "--out", f"{work}/results/template-seed0/mdqa", "--batch-size", "1"],
             [*py, "eval", "synthetic", "--model", run, "--base", base, *int8, *synthetic, "--label",
              "template-seed0", "--out", f"{work}/results/template-seed0/synthetic-template-seed0", "--batch-size", "1"]]
    assert [c for c in cmds if c[:3] == [*py, "eval"] and c[3] != "compare"] == evals
    assert cmds.index(train) + 1 == cmds.index(evals[2])  # evaluated straight from the run, no export between
    # the merged Hugging Face folder comes last, after the comparisons, on the host
    assert cmds[-3][:4] == [*py, "eval", "compare"]
    assert cmds[-2:] == [["rm", "-rf", f"{work}/hf/template-seed0"],
                         ["env", "JAX_PLATFORMS=cpu", *py, "jaxtrain", "export", "--checkpoint", run,
                          "--out", f"{work}/hf/template-seed0", "--merged", "--dtype", "bfloat16"]]

    bf16 = recipe_commands(tmp_path, WORK=work, BASE_MODEL=base, EVAL_DATA="/d", LORA_RANK="8", BASE_DTYPE="bfloat16",
                           LR="1e-4", TRAIN_ARGS="--lora-dropout 0.05", EXPORT_MERGED="0", CKPT_ROOT=CKPT,
                           EVAL_ARGS="--batch-size 2", GLOBAL_BATCH="8", GRAD_ACCUM="4")
    train = next(c for c in bf16 if c[:4] == [*py, "jaxtrain", "train"])
    assert train[train.index("--lr") + 1] == "1e-4"
    assert (train[train.index("--global-batch") + 1], train[train.index("--grad-accum") + 1]) == ("8", "4")
    assert train[train.index("--resume") + 1:] == ["--lora-rank", "8", "--base-dtype", "bfloat16", "--lora-dropout", "0.05"]
    evals = [c for c in bf16 if c[:3] == [*py, "eval"] and c[3] != "compare"]
    assert len(evals) == (6 + 6) + 6 * (6 + 1)
    assert all(c[c.index("--base-dtype") + 1] == "bfloat16" and c[-2:] == ["--batch-size", "2"] for c in evals)
    assert not any("export" in c for c in bf16)
    # a run in a bucket is copied here first: python -m eval reads local folders
    i = bf16.index(train)
    assert bf16[i + 1:i + 3] == [["rm", "-rf", f"{work}/runs/template-seed0"],
                                 ["gcloud", "storage", "rsync", "--recursive", f"{CKPT}/template-seed0",
                                  f"{work}/runs/template-seed0"]]
    assert bf16[i + 3][4:8] == ["--model", f"{work}/runs/template-seed0", "--base", base]

    # the long-context recipe evaluates its LoRA runs the same way; BASE_EVAL_DTYPE picks the base's dtype
    proc = sh(SCRIPTS / "recipes" / "paper_mistral7b_v02_24k.sh", "--dry-run",
              env=clean_env(tmp_path, WORK=work, BASE_MODEL="/m", EVAL_DATA="/d", LORA_RANK="16",
                            BASE_EVAL_DTYPE="bfloat16", EXPORT_MERGED="0"))
    evals = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("python3 -m eval synthetic")]
    assert [c[3:10] for c in evals] == [["synthetic", "--model", "/m", "--base-dtype", "bfloat16", *synthetic],
                                        ["synthetic", "--model", run, "--base", "/m", "--base-dtype", "bfloat16"]]
    (train,) = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("python3 -m jaxtrain train")]
    assert train[train.index("--grad-accum") + 1] == "16"  # its full finetune's 2 would not fit one chip


def test_long_context_recipe_shares_the_steps(tmp_path):
    """The 24K recipe (paper_mistral7b_v02_24k.sh) takes the same shared steps with its own presets."""
    recipe = SCRIPTS / "recipes" / "paper_mistral7b_v02_24k.sh"
    proc = sh(recipe, "--dry-run", env=clean_env(tmp_path, WORK="/w", BASE_MODEL="/m", EVAL_DATA="/d",
                                                   FLENQA_FILE="/f.jsonl"))
    cmds = [shlex.split(line) for line in proc.stdout.splitlines()]
    py = ["python3", "-m"]
    assert cmds[:3] == [
        [*py, "data_gen", "generate", "--preset", "paper-simple-24k", "--seed", "0", "--template", "--overwrite",
         "--out", "/w/data/template-seed0"],
        ["rm", "-rf", "/w/shards/template-seed0"],
        [*py, "data_gen", "shards", "--input", "/w/data/template-seed0/train.jsonl", "--out",
         "/w/shards/template-seed0", "--buckets", "24576"]]
    assert [*py, "eval", "mdqa", "--model", "/m", "--data-dir", "/d/mdqa", "--num-docs", "120", "--gold-positions",
            "0,29,59,89,119", "--closed-book", "--label", "base", "--out", "/w/results/base/mdqa120", "--dtype",
            "bfloat16", "--shard", "--batch-size", "1"] in cmds
    assert [*py, "jaxtrain", "train", "--model", "mistral-7b-instruct-v0.2", "--init-from", "/m", "--data",
            "/w/shards/template-seed0", "--out", "/w/runs/template-seed0", "--epochs", "2", "--lr", "5e-6",
            "--global-batch", "16", "--grad-accum", "2", "--seed", "0", "--resume"] in cmds
    (compare,) = [c for c in cmds if c[:4] == [*py, "eval", "compare"]]
    assert compare[4:] == [f"/w/results/{m}/{k}/results.json" for m in ("base", "template-seed0")
                           for k in ("mdqa120", "flenqa", "flenqa-cot")] + [
        "/w/results/base/synthetic-template-seed0/results.json",
        "/w/results/template-seed0/synthetic-template-seed0/results.json",
        "--labels", *["base"] * 3, *["template"] * 3, "base", "template", "--out", "/w/results/compare"]
    assert sum(c[:3] == [*py, "eval"] for c in cmds) == 2 * 4 + 1


def test_smollm2_recipe_compares_kv_needle_and_base_on_the_same_prompts(tmp_path):
    """VARIANTS="template niah" over two seeds (the paper's comparison with its needle-in-a-haystack baseline):
    the needle data comes from `data_gen niah` on the MDQA distractor passages at the KV prompts' length with the
    model's tokenizer; each needle run is trained on its seed, answers its seed's held-out KV prompts (not its own
    needle questions) and sits beside the KV run of that seed in every table; the seeds' KV table holds the base
    model, the KV runs and the needle runs, labelled by variant so that the seeds average."""
    work, base, data = "/w", "/m/smol", "/d"
    cmds = recipe_commands(tmp_path, SMOLLM2_RECIPE, WORK=work, BASE_MODEL=base, EVAL_DATA=data, SEEDS="0 1",
                           VARIANTS="template niah", TASKS="synthetic mdqa")
    py = ["python3", "-m"]
    niah = [c for c in cmds if c[:4] == [*py, "data_gen", "niah"]]
    assert niah == [[*py, "data_gen", "niah", "--seed", s, "--haystack", "mdqa:/d/mdqa", "--context-tokens", "1000",
                     "--num-train", "350", "--num-eval", "150", "--tokenizer", base, "--overwrite", "--out",
                     f"/w/data/niah-seed{s}"] for s in "01"]
    trains = [c for c in cmds if c[:4] == [*py, "jaxtrain", "train"]]
    assert [(c[c.index("--data") + 1], c[c.index("--seed") + 1]) for c in trains] == [
        (f"/w/shards/{v}-seed{s}", s) for s in "01" for v in ("template", "niah")]
    # exported in the float32 of the imported base: base and finetuned are evaluated at the same precision
    exports = [c for c in cmds if c[:4] == [*py, "jaxtrain", "export"]]
    assert [c[c.index("--out") + 1:] for c in exports] == [
        [f"/w/hf/{v}-seed{s}", "--dtype", "float32"] for s in "01" for v in ("template", "niah")]
    synthetic = [(c[c.index("--label") + 1], c[c.index("--data-file") + 1]) for c in cmds
                 if c[:4] == [*py, "eval", "synthetic"]]
    assert synthetic == [("base", "/w/data/template-seed0/eval.jsonl"), ("base", "/w/data/template-seed1/eval.jsonl"),
                         ("template-seed0", "/w/data/template-seed0/eval.jsonl"),
                         ("niah-seed0", "/w/data/template-seed0/eval.jsonl"),
                         ("template-seed1", "/w/data/template-seed1/eval.jsonl"),
                         ("niah-seed1", "/w/data/template-seed1/eval.jsonl")]
    compares = {c[c.index("--out") + 1]: (c[4:c.index("--labels")], c[c.index("--labels") + 1:c.index("--out")])
                for c in cmds if c[:4] == [*py, "eval", "compare"]}
    assert compares["/w/results/compare/synthetic-template-seed1"] == (
        [f"/w/results/{m}/synthetic-template-seed1/results.json" for m in ("base", "template-seed1", "niah-seed1")],
        ["base", "template", "niah"])
    assert compares["/w/results/compare/mdqa"][1] == ["base", "template", "niah", "template", "niah"]
    assert compares["/w/results/compare/synthetic-template"] == (
        [f"/w/results/base/synthetic-template-seed{s}/results.json" for s in "01"]
        + [f"/w/results/{m}-seed{s}/synthetic-template-seed{s}/results.json" for m in ("template", "niah") for s in "01"],
        ["base"] * 2 + ["template"] * 2 + ["niah"] * 2)
    assert len(compares) == 4 and not any("niah-seed0/eval.jsonl" in " ".join(c) for c in cmds)


def test_smollm2_recipe_lora_trains_and_evaluates_like_its_full_finetune(tmp_path):
    """LORA_RANK=16 on the CPU recipe: the adapters train on the float32 base in float32 compute with full remat
    (the full finetune's settings: the fastest CPU step, no bf16 rounding), at LoRA's lr 1e-3, one row per
    micro-batch; the base model and the run are evaluated in float32, eight prompts a batch, the run straight
    from its adapters; no merged export unless asked for, and then in the base's float32, like the full
    finetune's export."""
    cmds = recipe_commands(tmp_path, SMOLLM2_RECIPE, WORK="/w", BASE_MODEL="/m/smol", EVAL_DATA="/d", LORA_RANK="16",
                           TASKS="synthetic")
    py = ["python3", "-m"]
    (train,) = [c for c in cmds if c[:4] == [*py, "jaxtrain", "train"]]
    assert train[train.index("--lr"):] == ["--lr", "1e-3", "--global-batch", "16", "--grad-accum", "16", "--seed", "0",
                                           "--resume", "--lora-rank", "16", "--base-dtype", "float32",
                                           "--dtype", "float32", "--remat", "full"]
    evals = [c for c in cmds if c[:4] == [*py, "eval", "synthetic"]]
    assert [c[4:6] + c[c.index("--base-dtype"):c.index("--base-dtype") + 2] + c[-4:] for c in evals] == [
        ["--model", m, "--base-dtype", "float32", "--compute-dtype", "float32", "--batch-size", "8"]
        for m in ("/m/smol", "/w/runs/template-seed0")]
    assert not any("export" in c for c in cmds)
    merged = recipe_commands(tmp_path, SMOLLM2_RECIPE, WORK="/w", BASE_MODEL="/m/smol", EVAL_DATA="/d", LORA_RANK="16",
                             TASKS="synthetic", EXPORT_MERGED="1")
    assert merged[-1][-4:] == ["/w/hf/template-seed0", "--merged", "--dtype", "float32"]


def test_mistral_recipe_needle_baseline_is_the_papers_length(tmp_path):
    """The 7B recipe's needle data: 4K-token haystacks (data_gen niah's default, the KV prompts' length) of the
    MDQA distractor passages under EVAL_DATA, counted with Mistral's tokenizer (the default)."""
    cmds = recipe_commands(tmp_path, WORK="/w", BASE_MODEL="/m", EVAL_DATA="/d", SEEDS="2", VARIANTS="niah",
                           TASKS="synthetic mmlu")
    assert [c for c in cmds if c[2:4] == ["data_gen", "niah"]] == [
        ["python3", "-m", "data_gen", "niah", "--seed", "2", "--haystack", "mdqa:/d/mdqa", "--overwrite", "--out",
         "/w/data/niah-seed2"]]
    # no KV data set in the grid: the needle run has no held-out KV prompts to answer, only the tasks
    assert [c[3] for c in cmds if c[2] == "eval"] == ["mmlu", "mmlu", "compare"]


@pytest.mark.parametrize("env, message", [
    ({}, "set BASE_MODEL"),
    ({"BASE_MODEL": "/nonexistent"}, "no config.json"),
    ({"TINY": "1", "EVAL_DATA": ""}, "MDQA needs EVAL_DATA"),
    ({"TINY": "1", "EVAL_DATA": "/nonexistent"}, "EVAL_DATA=/nonexistent is not a folder"),
    ({"TINY": "1", "VARIANTS": "templat"}, "VARIANTS takes template, notemplate and niah"),
    ({"TINY": "1", "VARIANTS": "niah", "EVAL_DATA": "", "TASKS": "synthetic"}, "VARIANTS=niah needs NIAH_ARGS"),
    ({"TINY": "1", "LORA_RANK": "r16"}, "LORA_RANK must be a whole number"),
    ({"TINY": "1", "LORA_RANK": "16", "EVAL_ARGS": "--dtype bfloat16"}, "drop --dtype"),
    ({"TINY": "1", "LORA_RANK": "16", "BASE_EVAL_DTYPE": "fp8"}, "BASE_EVAL_DTYPE takes int8, bfloat16 or float32"),
    ({"TINY": "1", "LORA_RANK": "16", "EXPORT_MERGED": "yes"}, "EXPORT_MERGED takes 1"),
    ({"TINY": "1", "EXPORT_DTYPE": "bf16"}, "EXPORT_DTYPE takes bfloat16, float32 or float16, not 'bf16'"),
])
def test_recipe_refuses_bad_settings(tmp_path, env, message):
    env = {"EVAL_DATA": str(tmp_path), **env}
    proc = sh(RECIPE, env=clean_env(tmp_path, WORK=str(tmp_path / "w"), **env), check=False)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize("status", [3, 75])
def test_recipe_rerun_skips_finished_steps(tmp_path, status):
    """A recipe that died in training (e.g. a preempted spot TPU) continues there when re-run: nothing that
    finished is redone and training starts again with --resume. The stand-in interpreter only records its
    arguments (and fails once, with an error or with 75, what `python -m jaxtrain train` returns after saving on
    SIGTERM: the step is not done either way), to follow the recipe's control flow."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    f'[[ -n ${{FAIL_ON:-}} && "$*" == *"$FAIL_ON"* ]] && exit {status}\nexit 0\n')
    fake.chmod(0o755)
    env = clean_env(tmp_path, TINY="1", WORK=str(tmp_path / "w"), EVAL_DATA=str(tmp_path), PYTHON=str(fake),
                    CALLS=str(calls), TASKS="mdqa synthetic")
    first = sh(RECIPE, env={**env, "FAIL_ON": "jaxtrain train"}, check=False)
    assert first.returncode == status
    assert ("train-template-seed0: interrupted (exit status 75" in first.stderr) == (status == 75)
    assert not (tmp_path / "w" / ".done" / "train-template-seed0").exists()
    first_calls = calls.read_text().splitlines()
    assert first_calls[-1].startswith("-m jaxtrain train") and first_calls[-1].endswith(" --resume")
    calls.unlink()
    sh(RECIPE, env=env)
    second = calls.read_text().splitlines()
    assert second[0] == first_calls[-1]
    assert not set(first_calls[:-1]) & set(second)
    assert [c.split()[1:4] for c in second[1:]] == [
        ["jaxtrain", "export", "--checkpoint"], ["eval", "mdqa", "--model"], ["eval", "synthetic", "--model"],
        ["eval", "compare", f"{tmp_path}/w/results/base/mdqa/results.json"],
        ["eval", "compare", f"{tmp_path}/w/results/base/synthetic-template-seed0/results.json"]]



def run_recipe_for_real(recipe: Path, tmp_path: Path, **env: str) -> Path:
    """Run a recipe with TINY=1 on the CPU, every step for real, with this interpreter and the shared
    evaluation data; returns its WORK folder."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared evaluation data not found at {SHARED_DATA}")
    work = tmp_path / "work"
    passed = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TPU_ACCELERATOR_TYPE",
                                         "ALLOW_MULTIPLE_LIBTPU_LOAD") if k in os.environ}
    # no XLA_FLAGS: one CPU device, as a single-chip run would have (conftest forces 8 in this process)
    # PYTHONPATH: this checkout's code, also where the installed (editable) package is another checkout
    full_env = clean_env(tmp_path, **passed, TINY="1", EVAL_DATA=str(SHARED_DATA), WORK=str(work),
                         PYTHON=sys.executable, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run(["bash", str(recipe)], capture_output=True, text=True, env=full_env, timeout=1800,
                          cwd=tmp_path)
    assert proc.returncode == 0, f"{recipe.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "done: " in proc.stdout + proc.stderr
    return work


def check_full_finetune(work: Path, run: str, num_steps: int) -> None:
    """The full-finetune path's products: the run's final checkpoint, and its Hugging Face export that holds
    the trained weights (not the base's)."""
    import numpy as np
    from safetensors.numpy import load_file

    from jaxtrain.checkpoint import latest_step

    assert latest_step(work / "runs" / run) == num_steps
    hf = work / "hf" / run
    assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
    (exported,) = hf.glob("*.safetensors")
    (base,) = (work / "base-tiny").glob("*.safetensors")
    exported, base = load_file(exported), load_file(base)
    assert exported.keys() == base.keys()
    assert any(not np.array_equal(exported[k].astype(np.float32), base[k].astype(np.float32)) for k in base)


@pytest.mark.slow
def test_recipe_tiny_runs_end_to_end_full_finetune(tmp_path):
    """TINY=1 paper_mistral7b.sh for real on the CPU through the full-finetune path (the notebook's test takes
    the LoRA one): data and shards, the random tiny base evaluated on every task, `jaxtrain train`,
    `jaxtrain export`, the exported folder evaluated on every task, one comparison table per task and the
    MDQA plot."""
    work = run_recipe_for_real(RECIPE, tmp_path)
    run = "template-seed0"
    manifest = json.loads((work / "shards" / run / "manifest.json").read_text())
    check_full_finetune(work, run, num_steps=2 * -(-manifest["num_examples"] // 16))  # 2 epochs of batch 16
    tasks = ["mdqa", "mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open", f"synthetic-{run}"]
    for key in tasks:
        table = (work / "results" / "compare" / key / "table.txt").read_text()
        # the run's column is its variant; both models scored the first LIMIT=2 examples only
        assert table.splitlines()[0].split() == ["task", "metric", "(%)", "base", "(limit", "2)", "template",
                                                 "(limit", "2)", "template", "-", "base"], key
        finetuned = json.loads((work / "results" / run / key / "results.json").read_text())["model"]
        assert finetuned["kind"] == "hf_folder" and finetuned["path"] == str(work / "hf" / run), key
    assert "gold at 20" in (work / "results" / "compare" / "mdqa" / "table.txt").read_text()
    plot = work / "results" / "compare" / "mdqa" / "mdqa_compare.png"
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_long_context_recipe_tiny_runs_end_to_end(tmp_path):
    """TINY=1 paper_mistral7b_v02_24k.sh for real on the CPU: the same full-finetune path (train, export,
    the exported folder evaluated) with its own evaluations, MDQA at 30 documents (gold first and last,
    closed-book and oracle too) and the synthetic samples, in one table, and the MDQA plot."""
    work = run_recipe_for_real(SCRIPTS / "recipes" / "paper_mistral7b_v02_24k.sh", tmp_path)
    run = "template-seed0"
    manifest = json.loads((work / "shards" / run / "manifest.json").read_text())
    assert manifest["bucket_boundaries"] == [256]
    check_full_finetune(work, run, num_steps=2 * -(-manifest["num_examples"] // 16))
    table = (work / "results" / "compare" / "table.txt").read_text()
    for row in ["mdqa/30", "gold at 1 ", "gold at 30", "closed-book", "oracle", "synthetic"]:
        assert row in table, row
    for key in ["mdqa30", f"synthetic-{run}"]:
        finetuned = json.loads((work / "results" / run / key / "results.json").read_text())["model"]
        assert finetuned["kind"] == "hf_folder" and finetuned["path"] == str(work / "hf" / run), key
    plot = work / "results" / "compare" / "mdqa_compare.png"
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# ---------------------------------------------------------------- the Colab notebook


def test_notebook_is_valid_and_runs_the_recipe():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    assert '"paper_mistral7b.sh"' in source and 'TINY = os.environ.get("TINY", "0") == "1"' in source
    # the one-chip path: LoRA on the int8 base, evaluated on it one prompt at a time, no merged copy on the host
    assert "LORA_RANK = 16" in source and 'BASE_DTYPE = "int8"' in source and 'EVAL_ARGS = "--batch-size 1"' in source
    assert "BASE_EVAL_DTYPE = BASE_DTYPE" in source and "EXPORT_MERGED = False" in source
    assert "YOUR-ORG" not in source and 'PROJECT_SOURCE = os.environ.get("PROJECT_SOURCE", "")' in source
    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(cell.source, "<cell>", "exec")


def notebook_namespace() -> dict:
    """The notebook's cell that defines fetch_project, executed (it only defines functions)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "def fetch_project(" in c.source]
    namespace: dict = {}
    exec(compile(cell.source, "<fetch_project cell>", "exec"), namespace)
    return namespace


def test_notebook_shows_a_progress_bar_once_it_finishes(tmp_path, capsys):
    """The notebook's `sh` prints what a terminal would finally show: a tqdm bar, rewritten with a carriage return
    at each of its 40 refreshes, is one line (its final state), not one line per refresh; a failing command
    raises with its exit status."""
    sh = notebook_namespace()["sh"]
    script = tmp_path / "bar.py"
    script.write_text("from tqdm import tqdm\nprint('before', flush=True)\n"
                      "for _ in tqdm(range(40), desc='eval', mininterval=0, ascii=True):\n    pass\n"
                      "print('after – done')\n")
    sh(sys.executable, script)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"+ {sys.executable} {script}", "before"] and lines[3:] == ["after – done"]
    assert lines[2].startswith("eval: 100%|##########| 40/40 [")
    with pytest.raises(RuntimeError, match="failed with exit status 3"):
        sh(sys.executable, "-c", "raise SystemExit(3)")


def test_notebook_fetches_the_project_from_each_kind_of_source(tmp_path, capsys):
    """PROJECT_SOURCE: a git URL, a `git archive` tarball, a `git bundle` or a checkout folder each give the
    source tree (made here from this repository's HEAD); anything else is refused with what to give instead."""
    fetch = notebook_namespace()["fetch_project"]
    recipe = Path("tpu_scripts", "recipes", "paper_mistral7b.sh")
    tarball, bundle = tmp_path / "needles-src.tar.gz", tmp_path / "needles.bundle"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", str(tarball), "HEAD"], check=True)
    subprocess.run(["git", "-C", str(ROOT), "bundle", "create", "-q", str(bundle), "HEAD"], check=True,
                   capture_output=True)
    for name, source in [("tar", tarball), ("bundle", bundle), ("url", f"file://{ROOT}")]:
        dest = fetch(str(source), tmp_path / name)
        assert (dest / recipe).read_bytes() == subprocess.run(
            ["git", "-C", str(ROOT), "show", f"HEAD:{recipe}"], capture_output=True, check=True).stdout, name
    assert (fetch(str(tmp_path / "tar"), tmp_path / "folder") / "pyproject.toml").is_file()
    (tmp_path / "x.whl").write_bytes(b"")
    (tmp_path / "other").mkdir()
    for source, error, message in [
        ("", ValueError, "PROJECT_SOURCE is not set"),
        (str(tmp_path / "missing.tar.gz"), FileNotFoundError, "no such file or folder"),
        (f"file://{tmp_path}/nowhere.git", ValueError, "git cannot read"),
        (f"file://{ROOT}#no-such-branch", ValueError, "no 'no-such-branch'"),
        (str(tmp_path / "x.whl"), ValueError, "a wheel leaves out tpu_scripts/"),
        (str(tmp_path / "other"), ValueError, "not this project's source tree"),
    ]:
        with pytest.raises(error, match=message) as info:
            fetch(source, tmp_path / "dest")
        assert "git archive" in str(info.value) or "source tree" in str(info.value)


@pytest.mark.slow
def test_notebook_executes_top_to_bottom_tiny(tmp_path, monkeypatch):
    """The whole notebook with TINY=1 on CPU: the recipe end to end with the tiny model through the one-chip
    LoRA path (int8 base, 16 micro-batches, the run evaluated with its adapters unmerged on the int8 base,
    the base model on it too, no merged export), plot shown inline."""
    import nbclient

    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared evaluation data not found at {SHARED_DATA}")
    work = tmp_path / "work"
    monkeypatch.setenv("TINY", "1")
    monkeypatch.setenv("EVAL_DATA", str(SHARED_DATA))
    monkeypatch.setenv("WORK", str(work))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device stands in for Colab's one chip (conftest forces 8)
    # this checkout's code, also where the installed (editable) package is another checkout of the project
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs)
    for model in ["base", "template-seed0"]:
        assert (work / "results" / model / "mdqa" / "results.json").is_file()
    assert (work / "results" / "compare" / "mdqa" / "mdqa_compare.png").is_file()
    assert "gold at 20" in (work / "results" / "compare" / "mdqa" / "table.txt").read_text()
    from jaxtrain.checkpoint import Checkpointer
    from jaxtrain.runs import run_settings

    with Checkpointer(work / "runs" / "template-seed0", read_only=True) as ckpt:
        _, _, metadata = ckpt.read_json()
    lora, base = run_settings(metadata)
    assert lora.rank == 16 and base["dtype"] == "int8" and base["init_from"] == str(work / "base-tiny")
    models = {m: json.loads((work / "results" / m / "mdqa" / "results.json").read_text())["model"]
              for m in ["base", "template-seed0"]}
    assert models["base"]["kind"] == "hf_folder" and models["base"]["base"]["dtype"] == "int8"
    finetuned = models["template-seed0"]
    assert finetuned["kind"] == "lora_run" and finetuned["base"]["dtype"] == "int8"
    assert finetuned["base"]["path"] == str(work / "base-tiny") and finetuned["adapters"]["merged"] is False
    assert finetuned["adapters"]["rank"] == 16 and not (work / "hf").exists()  # EXPORT_MERGED = False


# ---------------------------------------------------------------- the cost estimate (bench/tpu_cost.py)


def test_cost_estimate_flops_by_hand():
    """The FLOPs per step behind docs/tpu.md's cost table, recomputed by hand from Mistral 7B's shapes."""
    from bench import tpu_cost
    from jaxtrain.config import ModelConfig

    config = ModelConfig.preset("mistral-7b-instruct-v0.1")
    d, ff, kv, layers, vocab = 4096, 14336, 1024, 32, 32000
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d   # norms included
    tokens = 16 * 4096
    attention = 4 * layers * 32 * 128 * 2048 * tokens                  # QK^T + PV, causal: 2048 keys on average
    forward = 2 * body * tokens + attention                             # the layers, recomputed by remat
    head = 6 * vocab * d * 16 * 64                                      # LM head on 64 answer tokens a row
    full = 6 * body * tokens + head + 3 * attention + forward
    assert tpu_cost.step_flops(config, 0) == pytest.approx(full, rel=1e-9)
    adapters = layers * 16 * (6 * d + 2 * kv + 3 * (d + ff))           # r16 on q k v o gate up down
    assert adapters == 41943040                                         # jaxtrain.lora's count (docs/lora.md)
    lora = full - 2 * body * tokens + 6 * adapters * tokens             # no weight gradients for the base
    assert tpu_cost.step_flops(config, 16) == pytest.approx(lora, rel=1e-9)
    # Colab's v5e-1: 22 steps an epoch at 50% of 197 TFLOP/s
    assert 22 * lora / (0.5 * 197e12) / 60 == pytest.approx(11.3, abs=0.1)
