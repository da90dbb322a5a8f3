"""Search by text and image, zero-shot labels with CLIP's templates, near-duplicates, the Python API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import vlmkit
from embed_fixtures import colour_encoder, colour_image, save_clip
from vlmkit.cli import main
from vlmkit.embeddings.dedupe import duplicate_groups, near_duplicates
from vlmkit.embeddings.embed import embed
from vlmkit.embeddings.index import EmbeddingIndex
from vlmkit.embeddings.search import search
from vlmkit.embeddings.templates import IMAGENET_TEMPLATES, TEMPLATES, resolve_templates
from vlmkit.embeddings.zeroshot import label_embeddings, parse_labels
from vlmkit.errors import ConfigError

NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def encoder():
    return colour_encoder()


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory, encoder):
    folder = tmp_path_factory.mktemp("colours")
    images = _mkdir(folder / "imgs")
    for i in range(12):
        colour_image(NAMES[i % 3], size=(20, 18), shade=3 * i).save(images / f"{NAMES[i % 3]}{i:02d}.png")
    embed([folder / "imgs"], folder / "index", model=encoder, progress=False)
    return folder


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_text_search_finds_the_named_colour_first(encoder, colour_index):
    for name in NAMES:
        hits = search(colour_index / "index", name, k=4, encoder=encoder)
        assert [h.image.rsplit("/", 1)[1][: len(name)] for h in hits] == [name] * 4  # recall@4 on the toy set: 1.0
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.9


def test_image_search_and_k(encoder, colour_index, tmp_path):
    query = tmp_path / "q.png"
    colour_image("blue", size=(50, 40)).save(query)
    hits = search(colour_index / "index", image=query, k=20, encoder=encoder)
    assert len(hits) == 12 and all("blue" in h.image for h in hits[:4]) and not any("blue" in h.image for h in hits[4:])
    with pytest.raises(ConfigError, match="not both and not neither"):
        search(colour_index / "index", "red", image=query, encoder=encoder)
    with pytest.raises(ConfigError, match="k must be positive"):
        search(colour_index / "index", "red", k=0, encoder=encoder)


def test_zero_shot_picks_the_known_answer_with_template_averaging(encoder, tmp_path):
    images = []
    for name in ["green", "red", "blue", "red"]:
        images.append(tmp_path / f"{name}{len(images)}.png")
        colour_image(name).save(images[-1])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    rows = list(vlmkit.classify(sorted(tmp_path.iterdir()), "red, green ,blue", model=encoder, templates="imagenet"))
    by_name = {r["image"].rsplit("/", 1)[1]: r for r in rows}
    assert {n: r["label"] for n, r in by_name.items() if r["error"] is None} == {
        "blue2.png": "blue", "green0.png": "green", "red1.png": "red", "red3.png": "red"}  # fmt: skip
    assert by_name["bad.jpg"]["label"] is None and "bad.jpg" in by_name["bad.jpg"]["error"]
    good = by_name["red1.png"]
    assert abs(sum(good["probabilities"].values()) - 1) < 1e-5 and good["probabilities"]["red"] > 0.99
    # a label's embedding is the normalised mean of its 80 normalised template embeddings, as CLIP computes it
    weights = label_embeddings(encoder, ["red"], IMAGENET_TEMPLATES)
    each = encoder.embed_texts([t.format("red") for t in IMAGENET_TEMPLATES])
    mean = each.mean(0)
    np.testing.assert_allclose(weights[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert len(IMAGENET_TEMPLATES) == 80 and IMAGENET_TEMPLATES[0] == "a bad photo of a {}."


def test_labels_and_templates_are_checked(tmp_path):
    assert parse_labels("sedan,suv, hatchback") == ["sedan", "suv", "hatchback"]
    with pytest.raises(ConfigError, match="at least two labels"):
        parse_labels("sedan")
    with pytest.raises(ConfigError, match="repeated: suv"):
        parse_labels("suv,suv")
    (tmp_path / "t.txt").write_text("a car: {}\n\nthe {} itself\n")
    assert resolve_templates(tmp_path / "t.txt") == ("a car: {}", "the {} itself")
    (tmp_path / "bad.txt").write_text("no slot\n")
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_templates(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match="not a template set"):
        resolve_templates("nonsense")
    assert TEMPLATES.get("shapes")[0] == "There is one object: a small {} at the top left."


def test_near_duplicates_are_every_pair_over_the_threshold(encoder, tmp_path):
    folder = _mkdir(tmp_path / "imgs")
    colour_image("red").save(folder / "a.png")
    colour_image("red").save(folder / "a-copy.bmp")  # the same pixels in another file
    colour_image("red", shade=4).save(folder / "b.png")
    colour_image("green").save(folder / "c.png")
    colour_image("blue").save(folder / "d.png")
    embed([folder], tmp_path / "index", model=encoder, progress=False)
    index = EmbeddingIndex.open(tmp_path / "index")
    ids, vectors = index.live_vectors()
    sims = vectors @ vectors.T
    for threshold in (0.999, 0.9, 0.0, -0.5):
        pairs = near_duplicates(index, threshold)
        expected = sorted(((float(sims[i, j]), i, j) for i in range(5) for j in range(i + 1, 5)
                           if sims[i, j] >= np.float32(threshold)), key=lambda t: (-t[0], t[1], t[2]))  # fmt: skip
        assert [(p.a, p.b) for p in pairs] == [(index.row(ids[i])["image"], index.row(ids[j])["image"])
                                               for _, i, j in expected]  # fmt: skip
        assert all(abs(p.score - s) < 1e-6 for p, (s, _, _) in zip(pairs, expected, strict=True))
    top = near_duplicates(index, 0.999)
    assert (top[0].a.rsplit("/", 1)[1], top[0].b.rsplit("/", 1)[1]) == ("a-copy.bmp", "a.png")
    assert top[0].score > 0.99999
    groups = duplicate_groups(near_duplicates(index, 0.99))
    assert [[p.rsplit("/", 1)[1] for p in g] for g in groups] == [["a-copy.bmp", "a.png", "b.png"]]
    with pytest.raises(ConfigError, match="in \\(-1, 1\\]"):
        near_duplicates(index, 1.5)


def test_python_api(encoder, colour_index, tmp_path):
    embedder = vlmkit.Embedder(encoder)
    assert embedder.dim == 3 and embedder.texts(["red"]).shape == (1, 3)
    image = tmp_path / "g.png"
    colour_image("green").save(image)
    assert [p.label for p in embedder.classify([image, colour_image("blue")], ["red", "green", "blue"])] == [
        "green", "blue"]  # fmt: skip
    assert "green" in embedder.search(colour_index / "index", "green", k=1)[0].image
    pairs, groups = vlmkit.find_duplicates(colour_index / "index", 0.99)
    assert len(groups) == 3 and all(len(g) == 4 for g in groups) and len(pairs) >= 3 * 3
    assert len(vlmkit.open_index(colour_index / "index")) == 12


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip"))


def test_cli_embed_search_classify(clip_folder, tmp_path, capsys):
    folder = _mkdir(tmp_path / "imgs")
    for i in range(5):
        Image.new("RGB", (40, 32), (50 * i, 200 - 30 * i, 90)).save(folder / f"img{i}.png")
    Image.new("RGB", (40, 32), (50, 170, 90)).save(folder / "copy.png")  # img1's pixels again
    (folder / "broken.png").write_bytes(b"junk")
    out = tmp_path / "index"
    assert main(["embed", str(folder), "--model", str(clip_folder), "--out", str(out), "--quiet"]) == 0
    assert "6 embedded, 1 failed, 0 unchanged" in capsys.readouterr().err
    assert main(["embed", str(folder), "--out", str(out), "--quiet", "--dedupe", "0.9999", "--json"]) == 0
    captured = capsys.readouterr()
    assert "0 embedded, 0 failed, 7 unchanged" in captured.err  # the index's own model, no --model needed
    pair = json.loads(captured.out.strip())
    assert sorted(p.rsplit("/", 1)[1] for p in (pair["a"], pair["b"])) == ["copy.png", "img1.png"]
    assert pair["score"] > 0.9999 and "1 near-duplicate pair(s)" in captured.err

    assert main(["search", str(out), "--image", str(folder / "img3.png"), "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 3 and hits[0]["image"] == str(folder / "img3.png") and hits[0]["score"] > 0.9999
    assert main(["search", str(out), "a red circle", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(float(line.split("\t")[0]) <= 1.0 for line in lines)
    assert main(["search", str(out), "--dedupe", "0.9999"]) == 0
    assert capsys.readouterr().out.count("\t") == 2

    assert main(["classify", str(folder), "--labels", "red circle,blue square", "--model", str(clip_folder),
                 "--out", str(tmp_path / "labels.jsonl")]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and sum(r["error"] is not None for r in rows) == 1
    assert all(r["label"] in ("red circle", "blue square") for r in rows if r["error"] is None)
    assert "6 classified" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "{out}"], "give a query TEXT or --image PATH"),
        (["search", "{out}", "red", "--image", "{img}"], "give a query TEXT or --image PATH"),
        (["search", "{out}", "red", "--dedupe", "0.9"], "takes no query"),
        (["search", "{tmp}/nowhere", "red"], "not an embedding index"),
        (["search", "{out}", "--image", "{tmp}/missing.png"], "missing.png"),
        (["embed", "{tmp}/nowhere", "--out", "{out}"], "no such file or folder"),
        (["embed", "{img}", "--out", "{out}", "--model", "clip-shapes"], "holds embeddings of model"),
        (["classify", "{img}", "--labels", "one"], "at least two labels"),
        (["classify", "{img}", "--labels", "a,b", "--templates", "nonsense"], "not a template set"),
        (["embed", "{img}", "--out", "{tmp}/new", "--model", "nope"], "unknown embedding model 'nope'"),
    ],
)
def test_cli_errors_are_one_clear_line(argv, message, clip_folder, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(img)
    out = tmp_path / "index"
    assert main(["embed", str(img), "--model", str(clip_folder), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    filled = [a.format(out=out, img=img, tmp=tmp_path) for a in argv]
    assert main(filled) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("name, argument", [("embed", "--dedupe"), ("search", "--image"), ("classify", "--labels")])
def test_command_help(name, argument, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and argument in capsys.readouterr().out
