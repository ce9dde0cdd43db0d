"""Bad input, as a user types it: every case ends in exactly one `[lw] error` line naming the
value and what is accepted (exit 1, no traceback), before the forward pass where the input is
known by then; inputs that can be measured but give NaN set metrics warn why (exit 0).

Each case is a real `python -m lw.run` on a tiny model; the cases run two at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import lw_cli

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

TEXTS = [f"The quick brown fox jumps over the lazy dog number {i} in the forest."
         for i in range(40)]


def write_files(tmp: Path) -> None:
    def jsonl(name: str, rows: list[dict]) -> None:
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("good.jsonl", [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(TEXTS)])
    (tmp / "latin1.jsonl").write_bytes("".join(
        json.dumps({"text": f"café {i} in Paris"}, ensure_ascii=False) + "\n"
        for i in range(8)).encode("latin-1"))
    jsonl("dict.jsonl", [{"text": {"a": t}} for t in TEXTS[:8]])
    jsonl("zero_width.jsonl", [{"text": "\u200b\u200b\u200b"}] * 8)
    jsonl("one.jsonl", [{"text": TEXTS[0]}])
    jsonl("same.jsonl", [{"text": TEXTS[0]}] * 32)
    jsonl("one_label.jsonl", [{"text": t, "label": "a"} for t in TEXTS])
    jsonl("label_once.jsonl", [{"text": t, "label": "a" if i else "b"}
                               for i, t in enumerate(TEXTS)])
    lines = [json.dumps({"text": t}) + "\n" for t in TEXTS[:25]]
    lines[20] = '{"text": "broken\n'                 # line 21 (0-based row 20)
    (tmp / "bad_line.jsonl").write_text("".join(lines))
    pd.DataFrame({"text": list(range(8))}).to_parquet(tmp / "ints.parquet")


# name: (overrides, what the error line says (None: no error, exit 0), known before the
# forward pass). {tmp}: the case's folder; {ro}: a folder nobody may write to.
CASES = {
    "latin-1 jsonl": (["data.path={tmp}/latin1.jsonl"],
                      "line 1 is not UTF-8 (byte 0xe9", True),
    "jsonl bad line, 1-based": (["data.path={tmp}/bad_line.jsonl"],
                                "line 21 is not a JSON object", True),
    "text field holding a dict": (["data.path={tmp}/dict.jsonl"],
                                  "data.text_field='text': record 1 holds dict", True),
    "parquet text of ints": (["data.path={tmp}/ints.parquet"],
                             "data.text_field='text': record 1 holds int", True),
    "zero-width prompts": (["data.path={tmp}/zero_width.jsonl", "data.min_tokens=0"],
                           "none with a non-blank text", True),
    "1 prompt, intrinsic dimension": (["data.n_prompts=1", "metrics=[intrinsic_dimension]"],
                                      "intrinsic_dimension needs at least 3 prompts", True),
    "seed 2**70": (["seed=1180591620717411303424"],
                   "seed=1180591620717411303424: must lie in [0, 2**63 - 1]", True),
    "seed -1": (["seed=-1"], "seed=-1: must lie in", True),
    "a word for a number": (["data.n_prompts=abc"], "data.n_prompts='abc': Value 'abc' of "
                            "type 'str' could not be converted to Integer", True),
    "a word in a sweep of numbers": (["-m", "data.n_prompts=8,abc"], "data.n_prompts='abc'",
                                     True),
    "device_map": (["model.device_map=bogus"], "model.device_map='bogus' is not one of", True),
    "extraction device": (["extraction.device=tpu"], "extraction.device='tpu' is not one of",
                          True),
    "tracking uri scheme": (["tracking.uri=bogus://x"], "scheme 'bogus' is not one of", True),
    "empty experiment": (["tracking.experiment=''"], "tracking.experiment=''", True),
    "duplicated metric": (["metrics=[curvature,curvature]"],
                          "names curvature more than once", True),
    "no normalization": (["metric.normalizations=[]"], "metric.normalizations=[]: choose",
                         True),
    "probe: 2 prompts, 5 folds": (["data.n_prompts=2", "data.label_field=label",
                                   "metrics=[probe]"], "fewer than 5 (metric.probe.folds=5",
                                  True),
    "probe: one label": (["data.path={tmp}/one_label.jsonl", "data.label_field=label",
                          "metrics=[probe]"], "needs at least 2 classes", True),
    "probe: a label seen once": (["data.path={tmp}/label_once.jsonl", "data.n_prompts=40",
                                  "data.label_field=label", "metrics=[probe]"],
                                 "class 'b' of data.label_field has 1 prompts", True),
    "probe: 1000 folds": (["data.label_field=label", "metrics=[probe]",
                           "metric.probe.folds=1000"], "metric.probe.folds=1000", True),
    "credentials in the uri": (["tracking.uri=http://alice:s3cret@127.0.0.1:9"],
                               "tracking.uri holds credentials", True),
    "read-only run dir": (["hydra.run.dir={ro}/run"], "hydra.run.dir={ro}/run: cannot write",
                          True),
    "read-only store": (["tracking.uri=sqlite:///{ro}/mlflow.db"],
                        "(tracking.uri=sqlite:///{ro}/mlflow.db)", True),
    "read-only artifact location": (["tracking.artifact_location={ro}/art"],
                                    "(tracking.artifact_location={ro}/art)", True),
    "read-only sweep dir": (["-m", "hydra.sweep.dir={ro}/sweep"],
                            "hydra.sweep.dir={ro}/sweep: cannot write", True),
    "1-prompt file": (["data.path={tmp}/one.jsonl"], None, False),
    "32 identical prompts": (["data.path={tmp}/same.jsonl", "data.n_prompts=32"], None, False),
}
WARNINGS = {"1-prompt file": "only 1 prompt, so dataset_entropy, dip will be NaN",
            "32 identical prompts": "all 32 prompts are the same tokens, so dataset_entropy, dip"}


def read_only_folder(tmp: Path) -> tuple[Path | None, str]:
    """A folder even root cannot write to (immutable), or None and why chattr cannot make it."""
    folder = tmp / "read-only"
    folder.mkdir()
    if shutil.which("chattr") is None:
        return None, "chattr is not installed (apt-get install e2fsprogs)"
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        said = " ".join(done.stderr.split())
        return None, (f"`chattr +i` failed: {said} (it needs root and a file system with "
                      "immutable files, such as ext4)")
    return folder, ""


def run_case(tmp: Path, ro: Path | None, name: str):
    overrides, _, _ = CASES[name]
    if any("{ro}" in o for o in overrides) and ro is None:
        return None
    folder = tmp / name.replace(" ", "_").replace(",", "").replace(":", "")
    folder.mkdir()
    values = {"tmp": tmp, "ro": ro}
    given = [o.format(**values) for o in overrides]
    mode = [o for o in given if o == "-m"]
    base = ["model=tiny-pythia", "data=local", f"data.path={tmp}/good.jsonl", "data.n_prompts=8",
            "data.max_tokens=32", f"tracking.uri=sqlite:///{folder}/mlflow.db",
            f"tracking.artifact_location={folder}/art", f"hydra.run.dir={folder}/run",
            f"hydra.sweep.dir={folder}/sweep"]
    # a secret's case keeps a real process: what it must not leave is in the process's output
    return lw_cli(folder, *mode, *base, *[o for o in given if o != "-m"],
                  in_process="credentials" not in name)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    write_files(tmp)
    ro, why = read_only_folder(tmp)
    try:
        # one after the other: the CLI runs in this process (lw_cli), one job at a time
        done = {name: run_case(tmp, ro, name) for name in CASES}
    finally:
        if ro is not None:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
    return {"tmp": tmp, "ro": ro, "why": why, "done": done}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_line(outcomes, name):
    done = outcomes["done"][name]
    if done is None:
        pytest.skip(f"no folder root cannot write to: {outcomes['why']}")
    _, said, early = CASES[name]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lw] error")]
    if said is None:
        assert done.returncode == 0, done.stderr[-3000:]
        assert not errors
        assert WARNINGS[name] in done.stderr
        return
    said = said.format(tmp=outcomes["tmp"], ro=outcomes["ro"])
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(errors) == 1 and said in errors[0], errors or done.stderr[-3000:]
    if early:  # refused before the forward pass (its progress bar says "prompts")
        assert "prompts:" not in done.stderr


def test_credentials_reach_no_file(outcomes):
    """The refused URI's password is in no file of the case's folder: Hydra wrote nothing."""
    folder = outcomes["tmp"] / "credentials_in_the_uri"
    assert outcomes["done"]["credentials in the uri"].returncode == 1
    assert not (folder / "run").exists()
    for path in folder.rglob("*"):
        if path.is_file():
            assert b"s3cret" not in path.read_bytes(), path


# a job writes ~320 KiB in its folder and ~300 KiB of artifacts: each size fills at another
# step (its results, its figures, the upload to the artifact store)
FULL_DISKS = {"32 KiB": "32k", "200 KiB": "200k", "480 KiB": "480k"}


@pytest.fixture(scope="module")
def full_disks(tmp_path_factory):
    """A real full disk: a tmpfs of each size (mounting needs root) holding the job's folder
    and its artifacts; the store (SQLite) beside it, so the run's status can be written.
    Or a str: why no tmpfs could be mounted."""
    tmp = tmp_path_factory.mktemp("full-disk")
    write_files(tmp)
    if shutil.which("mount") is None:
        return "mount is not installed (apt-get install mount)"
    done, mounted = {}, []
    try:
        for name, size in FULL_DISKS.items():
            disk = tmp / f"disk-{size}"
            disk.mkdir()
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                    str(disk)], capture_output=True, text=True)
            if mount.returncode != 0:
                said = " ".join(mount.stderr.split())
                return (f"`mount -t tmpfs` failed: {said} (it needs root, with CAP_SYS_ADMIN "
                        "in a container)")
            mounted.append(disk)
            store = tmp / f"store-{size}"
            store.mkdir()
            done[name] = (store, lw_cli(
                store, "model=tiny-pythia", "data=local", f"data.path={tmp}/good.jsonl",
                "data.n_prompts=8", "data.max_tokens=32",
                f"tracking.uri=sqlite:///{store}/mlflow.db",
                f"tracking.artifact_location={disk}/art", f"hydra.run.dir={disk}/run"))
    finally:
        for disk in mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)
    return done


@pytest.mark.parametrize("name", list(FULL_DISKS))
def test_a_full_disk_is_one_line_and_no_run_is_left_running(full_disks, name):
    if isinstance(full_disks, str):
        pytest.skip(f"no small tmpfs (a real full disk): {full_disks}")
    store, done = full_disks[name]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lw] error")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(errors) == 1 and "No space left on device" in errors[0], \
        errors or done.stderr[-3000:]
    if (store / "mlflow.db").exists():
        import sqlite3

        with sqlite3.connect(store / "mlflow.db") as db:
            statuses = [s for (s,) in db.execute("select status from runs")]
        assert "RUNNING" not in statuses, statuses
