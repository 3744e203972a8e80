"""`llmctl lineage`: a quantized model traced back to the raw file it came from, and every way
a link can stop holding (an upstream rebuilt, a file tampered with, a raw input edited, a
manifest hand-edited) flagged instead of trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact, sha256_file
from llmctl.cli import app
from llmctl.lineage import flagged, walk

# one worker builds the short chain once for both modules
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.xdist_group("short-chain"),
]
runner = CliRunner()


def cli(*args: object) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def chain(short_chain: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the short chain (tests here damage it), raw file included; the
    manifests' recorded paths still name the originals, so the copy is found as siblings."""
    root = short_chain["model"].parent
    shutil.copytree(root, tmp_path / "c", symlinks=True)
    return {k: tmp_path / "c" / v.name for k, v in short_chain.items()}


def test_lineage_of_a_quantized_model_reaches_the_raw_inputs(
    short_chain: dict[str, Path],
) -> None:
    nodes = walk(short_chain["q8"])
    assert [n.command for n in nodes] == ["quantize", "pretrain", "tokenize", "dedup", "clean",
                                          None]  # fmt: skip
    raw = nodes[-1]
    assert raw.kind == "file" and raw.path == str(short_chain["raw.jsonl"])
    assert raw.digest == sha256_file(short_chain["raw.jsonl"]) and raw.status == "ok"
    assert flagged(nodes) == []
    # each link names the node it leads to, with the digest recorded equal to the current one
    model = open_artifact(short_chain["model"], "checkpoint")
    (link,) = nodes[0].inputs
    assert (link.name, link.node, link.recorded, link.current, link.status) == (
        "checkpoint", 1, model.digest, model.digest, "ok")  # fmt: skip
    assert nodes[1].figures["steps"] == 4 and nodes[2].figures["vocab_size"] == 300
    assert nodes[1].config_digest is not None and len(nodes[1].config_digest) == 64

    code, out, _ = cli("lineage", short_chain["q8"], "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["path"] for d in data] == [n.path for n in nodes]
    assert data[4]["inputs"][0] == {
        "name": "input-0", "path": str(short_chain["raw.jsonl"]), "kind": "file",
        "recorded": raw.digest, "current": raw.digest, "status": "ok", "node": 5,
    }  # fmt: skip
    code, out, err = cli("lineage", short_chain["q8"])
    assert code == 0 and "every link holds" in err and "[5] " + str(short_chain["raw.jsonl"]) in out


def test_a_rebuilt_upstream_is_flagged_stale(chain: dict[str, Path]) -> None:
    code, _, err = cli("pretrain", chain["tokens"], "--out", chain["model"], "--preset", "tiny",
                       "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu",
                       "--force", "-q")  # fmt: skip
    assert code == 0, err
    nodes = walk(chain["q8"])
    assert nodes[1].status == "ok"  # the new model is sound, just not what q8 was made from
    assert nodes[0].inputs[0].status == "stale"
    assert flagged(nodes) == [f"{chain['q8']} <- checkpoint {nodes[0].inputs[0].path}: stale"]
    code, out, err = cli("lineage", chain["q8"])
    assert code == 0 and "STALE" in out and "not trusted" in err and "1 flagged" in err


def test_a_tampered_upstream_file_is_flagged(chain: dict[str, Path]) -> None:
    shard = next(chain["tokens"].glob("train-*.bin"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    nodes = walk(chain["q8"])
    tokens = next(n for n in nodes if n.kind == "tokens")
    assert tokens.status == "damaged" and "sha256 differs" in tokens.problem
    model = next(n for n in nodes if n.command == "pretrain")
    assert model.status == "ok" and model.inputs[0].status == "damaged"
    # the walk still goes on past the damaged node, to the raw file
    assert nodes[-1].kind == "file" and nodes[-1].status == "ok"


def test_a_hand_edited_manifest_and_a_changed_raw_file_are_flagged(
    chain: dict[str, Path],
) -> None:
    m = chain["dedup"] / "manifest.json"
    data = json.loads(m.read_text())
    data["digest"] = "0" * 64  # the files still verify; the digest no longer says them
    m.write_text(json.dumps(data))
    with chain["raw.jsonl"].open("a") as f:
        f.write('{"text": "one more line"}\n')
    nodes = walk(chain["tokens"])
    dedup = next(n for n in nodes if n.command == "dedup")
    assert dedup.status == "damaged" and "digest does not match" in dedup.problem
    assert nodes[0].inputs[0].status == "stale"  # tokens recorded the old digest
    raw = nodes[-1]
    assert (raw.status, nodes[-2].inputs[0].status) == ("changed", "changed")


def test_the_artifact_asked_about_must_itself_hold(chain: dict[str, Path]) -> None:
    (chain["q8"] / "config.json").write_text("{}")
    code, _, err = cli("lineage", chain["q8"])
    assert code == 2 and err.startswith("error: ") and "config.json" in err
    code, _, err = cli("lineage", chain["raw.jsonl"])
    assert (code, err) == (2, f"error: {chain['raw.jsonl']}: not an artifact (no manifest.json); "
                              "nothing to trace\n")  # fmt: skip
