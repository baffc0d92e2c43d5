import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from step_lightning.lit.policy_module import PolicyModule, align_to_patches, policy_losses
from step_lightning.models.checkpoint import load_policy

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


class Squares(Dataset):
    """Two-class images: a bright square on a dark background, labels to match (plus ignore)."""

    def __init__(self, n, size, val=False):
        self.n, self.size, self.val = n, size, val

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        lab = torch.zeros(self.size, self.size, dtype=torch.long)
        a = int(torch.randint(0, self.size // 2, (1,), generator=g))
        lab[a : a + self.size // 3, a : a + self.size // 2] = 1
        lab[-5:] = 255
        img = (lab.clamp(max=1) * 200 + 20).float().expand(3, -1, -1)
        img = (img - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        if self.val:  # validation convention: image resized, label at the original resolution
            img = torch.nn.functional.interpolate(img[None], size=(self.size // 2 + 3,) * 2, mode="bilinear")[0]
        return {"image": img, "label": lab}


def test_losses_ignore_excluded_windows():
    logits = {2: torch.tensor([[[5.0, -5.0]]], requires_grad=True)}
    losses = policy_losses(logits, {2: torch.tensor([[[255.0, 255.0]]])})
    assert losses["loss"] == 0
    losses["loss"].backward()
    assert (logits[2].grad == 0).all()
    losses = policy_losses({2: torch.tensor([[[0.0, 0.0]]])}, {2: torch.tensor([[[1.0, 255.0]]])})
    assert torch.isclose(losses["loss_2"], torch.log(torch.tensor(2.0)))


def test_align_to_patches_resizes_labels_and_crops():
    images, labels = align_to_patches(torch.zeros(1, 3, 70, 100), torch.ones(1, 140, 200, dtype=torch.long))
    assert images.shape == (1, 3, 64, 96) and labels.shape == (1, 64, 96) and labels.dtype == torch.long


@pytest.mark.slow  # a short Lightning fit: ~2 s alone, much more on a busy 2-core machine
def test_fit_checkpoint_and_load_policy(tmp_path):
    module = PolicyModule(pretrained=False, mean=MEAN, std=STD, lr=1e-3)
    trainer = L.Trainer(
        max_steps=2,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    train = DataLoader(Squares(4, 64), batch_size=2)
    val = DataLoader(Squares(2, 256, val=True), batch_size=1)
    trainer.fit(module, train, val)
    for s in (2, 4, 8):  # validation images are 131 px: no whole 16x16 window
        for name in ("precision", "recall", "auroc"):
            assert f"val/{name}_{s}" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["val/loss"])

    ckpt = tmp_path / "policy.ckpt"
    trainer.save_checkpoint(ckpt)
    policy = load_policy(str(ckpt))
    assert not policy.training and not any(p.requires_grad for p in policy.parameters())
    x = Squares(1, 64)[0]["image"][None]
    module.eval()
    with torch.no_grad():
        expected = module(x)
    got = policy(x)
    for s in expected:
        torch.testing.assert_close(got[s], expected[s])
