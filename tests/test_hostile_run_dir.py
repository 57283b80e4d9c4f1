"""The run folder is the run's, and an export never deletes what it exports from: through the command line, as a
user (or a second run) would meet it. Nothing of the user's is deleted or replaced, a live run's folder is
locked, and a damaged weight file is one line naming it."""
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_one_line, ppo_command, subprocess_env
from test_hostile import SMALL, ppo, run_copy, trained  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def digest(folder: Path) -> dict:
    """Every file and folder under ``folder`` -> its sha256 (folders: None)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def llmrl(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmrl", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(), timeout=timeout)


def users_folder(path: Path) -> Path:
    """What the audit trained into: a folder of the user's, with names llmrl also uses."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    for name in (".tmp-mywork", ".old-backup-1"):
        (path / name).mkdir()
        (path / name / "data.txt").write_text(f"{name} work")
    (path / "log.jsonl").write_text('{"step": 1, "my": "experiment"}\n')
    (path / "summary.json").write_text('{"my": "results"}\n')
    return path


def test_a_folder_of_the_users_is_refused_and_nothing_in_it_is_touched(tiny_model_dir, tmp_path):
    """It trained there (exit 0), deleting .tmp-mywork/ and .old-backup-1/ and replacing log.jsonl and
    summary.json; --overwrite too must delete none of them."""
    folder = users_folder(tmp_path / "mine")
    before = digest(folder)
    for flags in ([], ["--overwrite"], ["--resume"]):
        out = ppo(tiny_model_dir, folder, "train.total_steps=1", *flags)
        assert_one_line(out, f"run.output_dir = '{folder}' holds .old-backup-1, .tmp-mywork, log.jsonl, notes.txt, "
                             f"summary.json, but no llmrl run made this folder", "move those away")
        assert digest(folder) == before, flags  # not even a lock file is left behind


def test_a_run_folder_with_a_file_of_the_users_is_refused_without_overwrite_too(tiny_model_dir, run_copy):
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / ".tmp-mywork").mkdir()
    (run_copy / ".tmp-mywork" / "data.txt").write_text("work")
    before = digest(run_copy)
    for flags in (["--resume"], ["--overwrite"]):
        out = ppo(tiny_model_dir, run_copy, "train.total_steps=3", *flags)
        assert_one_line(out, "also holds .tmp-mywork, notes.txt, which llmrl did not write there")
        assert digest(run_copy) == before, flags


@pytest.mark.parametrize("where,fragment", [
    ("/", "is the root folder"),
    ("home", "is your home folder"),
    ("repo", "is llmrl's own source tree"),
    ("package", "is llmrl's own source tree"),
    ("inside-package", "is llmrl's own source tree"),
])
def test_root_home_and_the_source_tree_are_refused(tiny_model_dir, where, fragment):
    folder = {"/": Path("/"), "home": Path.home(), "repo": REPO, "package": REPO / "llmrl",
              "inside-package": REPO / "llmrl" / "envs" / "run"}[where]
    # --resume: the code before this check read these folders only (it found no checkpoint), so this test can
    # never make a run write into them
    out = ppo(tiny_model_dir, folder, "--resume")
    assert_one_line(out, f"run.output_dir = '{folder}' {fragment}")
    assert not (REPO / "llmrl" / "envs" / "run").exists()


def checkpoints(run: Path) -> dict:
    return {p.name: (p / "trainer_state.pt").is_file() for p in run.glob("step-*")}


def test_a_live_run_folder_is_locked(tiny_model_dir, tmp_path):
    """Two runs on one folder both trained (interleaving log.jsonl); --overwrite deleted a live run; --resume on
    a live run told the user to move a valid checkpoint away. The lock dies with its run (kill -9)."""
    run, log = tmp_path / "run", tmp_path / "live.err"
    with open(log, "w") as err:  # a long run, killed below
        live = subprocess.Popen(ppo_command([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run}",
                                             "train.total_steps=100000", "run.keep_last=100000"], ranks=0),
                                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=subprocess_env())
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and live.poll() is None and not (run / "step-000001").exists():
            time.sleep(0.2)
        assert live.poll() is None, log.read_text()[-3000:]
        before = checkpoints(run)
        assert before.get("step-000001")
        for flags in ([], ["--overwrite"], ["--resume"]):
            out = ppo(tiny_model_dir, run, "train.total_steps=3", *flags)
            assert_one_line(out, f"run.output_dir = '{run}' is in use by another llmrl run (pid {live.pid})")
            now = checkpoints(run)
            assert all(now.get(name) for name in before), (flags, before, now)  # none deleted nor half-written
        assert live.poll() is None  # the live run was not disturbed
    finally:
        live.kill()
        live.wait(timeout=60)
    last = max(checkpoints(run))
    resumed = ppo(tiny_model_dir, run, f"train.total_steps={int(last.split('-')[1])}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_only_leftovers_llmrl_marked_as_its_own_are_cleared(tiny_model_dir, run_copy):
    from llmrl.distributed.checkpoint import OWNED_MARK, begin_checkpoint

    (run_copy / ".tmp-step-000003").mkdir()  # named like llmrl's, but not marked: someone else's
    (run_copy / ".tmp-step-000003" / "data.txt").write_text("not llmrl's")
    before = digest(run_copy)
    out = ppo(tiny_model_dir, run_copy, "train.total_steps=2", "--resume")
    assert_one_line(out, "also holds .tmp-step-000003, which llmrl did not write there")
    assert digest(run_copy) == before
    shutil.rmtree(run_copy / ".tmp-step-000003")

    # what a run killed mid-checkpoint leaves: llmrl's own temporary folder, marked when it was made
    leftover = begin_checkpoint(run_copy / ".tmp-step-000003")
    (leftover / "value_head.safetensors").write_bytes(b"half")
    assert (leftover / OWNED_MARK).is_file()
    resumed = ppo(tiny_model_dir, run_copy, "train.total_steps=2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_copy / ".tmp-step-000003").exists()
    assert not list(run_copy.rglob(OWNED_MARK))  # complete checkpoints carry no temporary mark


@pytest.mark.parametrize("out", ["RUN", "RUN/final", "RUN/final/adapter/sub", "PARENT"])
def test_export_never_writes_into_what_it_exports_from(run_copy, out):
    """--checkpoint RUN/final --out RUN --overwrite left RUN holding the merged model only; --out inside the
    checkpoint wrote into it."""
    target = {"RUN": run_copy, "RUN/final": run_copy / "final", "RUN/final/adapter/sub": run_copy / "final" /
              "adapter" / "sub", "PARENT": run_copy.parent}[out]
    before = digest(run_copy.parent)
    for flags in ([], ["--overwrite"]):
        result = llmrl("export", "--checkpoint", run_copy / "final", "--out", target, *flags)
        assert_one_line(result, f"--out '{target}'", "an export never writes into (or with --overwrite replaces) "
                                                     "what it exports from")
        assert digest(run_copy.parent) == before, flags


@pytest.mark.parametrize("damage", ["truncated", "header", "nan"])
def test_export_names_a_damaged_adapter_file(run_copy, tmp_path, damage):
    path = run_copy / "final" / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "header":
        data[8] ^= 0xFF  # the first byte of the JSON header
    else:  # one float32 of the data (the file's last four bytes) flipped to NaN
        data[-4:] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(data))
    result = llmrl("export", "--checkpoint", run_copy / "final", "--out", tmp_path / "merged")
    assert_one_line(result, f"checkpoint file {path} ", "holds NaN or inf" if damage == "nan" else "is damaged",
                    "export an earlier checkpoint")
    assert not (tmp_path / "merged").exists()


def test_export_overwrites_only_an_earlier_export_and_verify_names_a_damaged_file(run_copy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = llmrl("export", "--checkpoint", run_copy / "final", "--out", mine, "--overwrite")
    assert_one_line(result, f"--out '{mine}' holds notes.txt, which llmrl export did not write there")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"

    merged = tmp_path / "merged"
    result = llmrl("export", "--checkpoint", run_copy / "final", "--out", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = (merged / "checksums.sha256").read_text()
    assert "  model.safetensors\n" in listed and "  config.json\n" in listed
    verified = llmrl("export", "--verify", merged)
    assert verified.returncode == 0 and "files match checksums.sha256" in verified.stdout, verified.stderr[-2000:]

    (merged / "notes.txt").write_text("mine")  # a file of the user's in an earlier export
    result = llmrl("export", "--checkpoint", run_copy / "final", "--out", merged, "--overwrite")
    assert_one_line(result, "holds notes.txt, which llmrl export did not write there")
    assert (merged / "notes.txt").read_text() == "mine"
    (merged / "notes.txt").unlink()
    result = llmrl("export", "--checkpoint", run_copy / "final", "--out", merged, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]

    weights = merged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # a NaN bit flip in the last weight
    weights.write_bytes(bytes(data))
    assert_one_line(llmrl("export", "--verify", merged), f"--verify: {weights} differs from its checksum")
