"""Use a locally stored OpenAI / open_clip checkpoint as the reranker.

Nothing is downloaded: the checkpoint must be a file on disk, and `open_clip_torch` (the
optional `clip` extra) is imported only here. Both failures give a message that names the
missing file or package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from megadalle.errors import CommandError

# The normalisation every OpenAI CLIP model was trained with (open_clip's OPENAI_DATASET_MEAN/STD).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipReranker:
    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int,
                 mean: tuple[float, ...] = _OPENAI_MEAN, std: tuple[float, ...] = _OPENAI_STD) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        # The model's own resize + normalise, done on tensors (our images are already [0,1]).
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(captions)).float(), dim=-1)
        return (img * txt).sum(-1)


def load_open_clip(model_name: str, checkpoint: str | Path) -> OpenClipReranker:
    """Build `model_name` (e.g. "ViT-B-32") from a local `checkpoint` file."""
    path = Path(checkpoint)
    if not model_name:
        raise CommandError("clip.open_clip_model is empty; name the architecture, e.g. --clip.open_clip_model=ViT-B-32")
    if not path.is_file():
        raise CommandError(f"open_clip checkpoint {path} does not exist; download it once and point "
                           f"--clip.open_clip_checkpoint at the file (nothing is fetched at run time)")
    try:
        import open_clip
    except ImportError:
        raise CommandError("using an open_clip checkpoint needs the optional package open_clip_torch; "
                           "install it with `pip install open_clip_torch` (or `pip install megadalle[clip]`)") from None
    try:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path))
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:  # unknown architecture, mismatched weights, corrupt file
        raise CommandError(f"could not load open_clip model {model_name!r} from {path}: {e}") from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = getattr(model.visual, "image_mean", None) or _OPENAI_MEAN
    std = getattr(model.visual, "image_std", None) or _OPENAI_STD
    return OpenClipReranker(model, tokenizer, size, tuple(mean), tuple(std))
