"""The two-tower retrieval model in PyTorch (CPU): towers, training loop, export.

User tower: the encoded request-time user features (``contract.tower.InputSpec``),
standardised, through a small ReLU MLP. Item tower: an MLP over the item's content vector
(standardised), a category embedding and a log-price-bucket embedding, plus an item-id
embedding (the sum of two hashed buckets) added to the MLP's output. The id part is used
only for items that appeared in the training rows; during training it is also dropped for
a share of the examples (id-dropout), so the content path alone must place an item, which
is how a new item is embedded. Embeddings are not normalised: the score is the raw dot
product, and an item's norm is free to carry its popularity.

Loss: a sampled softmax over, for each positive (user, item), the batch's other positives,
``uniform_negatives`` items drawn uniformly from the whole catalog (shared by the batch)
and ``hard_negatives`` items shown in the same request and not engaged with. Every
candidate's logit is corrected by the log of its expected count in the row's candidate
set (logQ correction: ``B·Q(item) + M/N``, Q the item's share of the training positives,
plus ``H/n`` for the row's own hard negatives drawn from ``n``), so the model estimates the
full-catalog softmax P(item | user) rather than one skewed toward popular candidates. The
uniform negatives matter here: a logging policy shows only a small pool of the catalog,
and without them items never shown would never be scored down.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from contract.tower import VALUE_WEIGHT, InputSpec, UserTower
from training.retrieval.ann import exact_top_k
from training.retrieval.evaluate import EvalGroups, recall_at_k
from training.retrieval.features import Catalog

log = logging.getLogger(__name__)

_MASK = -1e9
_SALTS = (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)


@dataclass(frozen=True)
class TowerConfig:
    """Model and training parameters (defaults: the sim-small preset within ~3 min)."""

    embedding_dim: int = 32
    user_hidden: tuple[int, ...] = (64, 64)
    item_hidden: tuple[int, ...] = (64,)
    category_dim: int = 8
    price_buckets: int = 16
    price_dim: int = 4
    id_buckets: int = 1 << 15
    id_dropout: float = 0.25
    batch_size: int = 1024
    uniform_negatives: int = 2048
    hard_negatives: int = 2
    purchase_weight: float = 1.0  # extra example weight of a purchased positive
    recency_half_life_days: float | None = 7.0  # example weight halves per this many days
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    max_epochs: int = 12
    patience: int = 2  # epochs without a better validation recall before stopping
    max_train_seconds: float = 150.0
    # Early stopping reads validation recall@eval_k. Not 500: on the simulator a logging
    # policy that shows few items makes recall@500 saturate near 0.99 for any
    # popularity-aware model, so it cannot tell epochs apart.
    eval_k: int = 50
    eval_groups: int = 2000  # validation groups scored after each epoch
    # test groups (user-days with an engagement) per kind that recall@k is measured on: a
    # uniform sample past it (10k groups: a standard error of at most 0.5 points). Exact
    # top-k over the whole catalogue costs ~10-20 ms a group on 500k items.
    test_groups: int = 10_000
    # value-aware retrieval (contract.tower.with_value_column): the exported index scores
    # taste + value_weight x log(price x margin); 0 exports the tower's taste alone
    value_weight: float = VALUE_WEIGHT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["user_hidden"] = list(self.user_hidden)
        d["item_hidden"] = list(self.item_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerConfig:
        """The config a stage report recorded (``to_dict``); unknown keys are refused."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown tower config keys {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)


# --- item inputs ---------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def hash_buckets(item_ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """``(n, 2)`` id-embedding buckets: two independent hashes, so two items rarely share
    both (a collision in one bucket is told apart by the other)."""
    ids = np.asarray(item_ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        cols = [_splitmix64(ids ^ np.uint64(salt)) % np.uint64(n_buckets) for salt in _SALTS]
    return np.stack(cols, axis=1).astype(np.int64)


@dataclass(frozen=True)
class ItemEncoder:
    """The item tower's input transform, fitted on the catalog and kept for new items."""

    content_mean: np.ndarray
    content_std: np.ndarray
    log_price_edges: np.ndarray
    id_buckets: int

    @classmethod
    def fit(cls, catalog: Catalog, cfg: TowerConfig) -> ItemEncoder:
        mean = catalog.content.mean(axis=0)
        std = np.maximum(catalog.content.std(axis=0), 1e-6)
        qs = np.linspace(0, 1, cfg.price_buckets + 1)[1:-1]
        edges = np.unique(np.quantile(np.log(np.maximum(catalog.price, 0.01)), qs))
        return cls(mean.astype(np.float32), std.astype(np.float32), edges, cfg.id_buckets)

    def encode(
        self,
        content: np.ndarray,
        category: np.ndarray,
        price: np.ndarray,
        item_ids: np.ndarray,
        known: np.ndarray,
    ) -> ItemInputs:
        """``known``: the item appeared in the training rows (its id embedding is trained)."""
        return ItemInputs(
            content=((content - self.content_mean) / self.content_std).astype(np.float32),
            category=np.asarray(category, dtype=np.int64),
            price_bucket=np.searchsorted(
                self.log_price_edges, np.log(np.maximum(price, 0.01)), side="right"
            ).astype(np.int64),
            buckets=hash_buckets(item_ids, self.id_buckets),
            known=np.asarray(known, dtype=bool),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "content_mean": self.content_mean.tolist(),
            "content_std": self.content_std.tolist(),
            "log_price_edges": self.log_price_edges.tolist(),
            "id_buckets": self.id_buckets,
            "id_hash": "splitmix64(item_id ^ salt) % id_buckets, salts " + str(list(_SALTS)),
        }


@dataclass(frozen=True)
class ItemInputs:
    content: np.ndarray
    category: np.ndarray
    price_bucket: np.ndarray
    buckets: np.ndarray
    known: np.ndarray

    def __len__(self) -> int:
        return len(self.category)


class _Tensors:
    """ItemInputs as tensors, for indexing inside the training loop."""

    def __init__(self, inputs: ItemInputs):
        self.content = torch.from_numpy(inputs.content)
        self.category = torch.from_numpy(inputs.category)
        self.price_bucket = torch.from_numpy(inputs.price_bucket)
        self.buckets = torch.from_numpy(inputs.buckets)
        self.known = torch.from_numpy(inputs.known)


# --- towers --------------------------------------------------------------------------------


def _mlp(width_in: int, hidden: tuple[int, ...], width_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        width_in = width
    layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


class UserTowerNet(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray, cfg: TowerConfig):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.mlp = _mlp(len(mean), cfg.user_hidden, cfg.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)


class ItemTowerNet(nn.Module):
    def __init__(self, content_dim: int, n_categories: int, cfg: TowerConfig):
        super().__init__()
        self.category = nn.Embedding(n_categories, cfg.category_dim)
        self.price = nn.Embedding(cfg.price_buckets, cfg.price_dim)
        width = content_dim + cfg.category_dim + cfg.price_dim
        self.mlp = _mlp(width, cfg.item_hidden, cfg.embedding_dim)
        self.item_id = nn.Embedding(cfg.id_buckets, cfg.embedding_dim)
        self.dim = cfg.embedding_dim
        nn.init.normal_(self.item_id.weight, std=0.01)

    def forward(
        self,
        content: torch.Tensor,
        category: torch.Tensor,
        price_bucket: torch.Tensor,
        buckets: torch.Tensor,
        use_id: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat([content, self.category(category), self.price(price_bucket)], dim=1)
        ids = self.item_id(buckets).sum(dim=1) * use_id.unsqueeze(1).to(content.dtype)
        return self.mlp(x) + ids

    def embed(self, items: ItemInputs, batch: int = 8192) -> np.ndarray:
        """``(items, dim)`` float32 embeddings; the id part only where ``items.known``."""
        t = _Tensors(items)
        parts = []
        with torch.no_grad():
            for s in range(0, len(items), batch):
                sl = slice(s, s + batch)
                parts.append(
                    self(
                        t.content[sl],
                        t.category[sl],
                        t.price_bucket[sl],
                        t.buckets[sl],
                        t.known[sl],
                    )
                )
        out = torch.cat(parts) if parts else torch.zeros((0, self.dim))
        return out.numpy().astype(np.float32)


def export_user_tower(net: UserTowerNet, spec: InputSpec) -> UserTower:
    """The numpy twin of ``net``: the same normalisation buffers and weights."""
    linears = [m for m in net.mlp if isinstance(m, nn.Linear)]
    return UserTower(
        spec=spec,
        mean=net.mean.detach().numpy().copy(),
        std=net.std.detach().numpy().copy(),
        weights=tuple(m.weight.detach().numpy().T.copy() for m in linears),
        biases=tuple(m.bias.detach().numpy().copy() for m in linears),
    )


# --- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Examples:
    """Training positives. The hard negatives of positive p are catalog rows
    ``neg_items[neg_start[p] : neg_start[p] + neg_count[p]]``."""

    user_x: np.ndarray  # (P, inputs) float32, encoded (not standardised)
    item_row: np.ndarray  # (P,) catalog row
    weight: np.ndarray  # (P,) float32
    neg_start: np.ndarray
    neg_count: np.ndarray
    neg_items: np.ndarray

    def __len__(self) -> int:
        return len(self.item_row)


@dataclass
class FitResult:
    user_net: UserTowerNet
    item_net: ItemTowerNet
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    # the wall-clock cap is a safety net: when it stops training, the model depends on the
    # machine's speed and load, and the report says so
    stopped_at_time_budget: bool = False


@dataclass(frozen=True)
class Validation:
    groups: EvalGroups
    user_x: np.ndarray  # (groups, inputs): encoded query features of each group


def fit(
    examples: Examples,
    items: ItemInputs,
    mean: np.ndarray,
    std: np.ndarray,
    n_categories: int,
    cfg: TowerConfig,
    seed: int = 0,
    valid: Validation | None = None,
) -> FitResult:
    """Train both towers; with ``valid``, keep the epoch of best validation recall@eval_k
    and stop after ``patience`` epochs without improvement. Deterministic given ``seed`` and
    torch's thread count."""
    if len(examples) == 0:
        raise ValueError("no training positives: the train split has no click or purchase")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    user_net = UserTowerNet(mean, std, cfg)
    item_net = ItemTowerNet(items.content.shape[1], n_categories, cfg)
    params = [*user_net.parameters(), *item_net.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    n_items, B = len(items), min(cfg.batch_size, len(examples))
    M, H = min(cfg.uniform_negatives, n_items), cfg.hard_negatives
    q = np.bincount(examples.item_row, minlength=n_items) / len(examples)
    shared_count = torch.from_numpy((B * q + M / n_items).astype(np.float32))
    t_items = _Tensors(items)
    user_x = torch.from_numpy(examples.user_x)
    item_row = torch.from_numpy(examples.item_row)
    weight = torch.from_numpy(examples.weight.astype(np.float32))
    result = FitResult(user_net, item_net)
    best_recall, best_state, stale = -1.0, None, 0
    started = time.perf_counter()
    steps = len(examples) // B  # drop the last partial batch: B enters the logQ correction

    for epoch in range(cfg.max_epochs):
        user_net.train()
        item_net.train()
        order = rng.permutation(len(examples))
        total = 0.0
        for step in tqdm(range(steps), desc=f"epoch {epoch}", leave=False):
            idx = order[step * B : (step + 1) * B]
            hard, hard_ok, hard_n = _draw_hard(examples, idx, H, rng)
            rows = torch.from_numpy(idx)
            batch = _Batch(
                user_x=user_x[rows],
                pos=item_row[rows],
                uniform=torch.from_numpy(rng.integers(0, n_items, M)),
                hard=torch.from_numpy(hard),
                hard_ok=torch.from_numpy(hard_ok),
                hard_n=torch.from_numpy(hard_n),
                weight=weight[rows],
            )
            keep_id = torch.from_numpy(rng.random(B + M + B * H) >= cfg.id_dropout)
            loss = _loss(user_net, item_net, t_items, batch, shared_count, keep_id)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().item()

        record = {"epoch": float(epoch), "loss": total / max(steps, 1)}
        if valid is not None and len(valid.groups):
            record["valid_recall"] = validation_recall(user_net, item_net, items, valid, cfg.eval_k)
            if record["valid_recall"] > best_recall:
                best_recall, stale = record["valid_recall"], 0
                best_state = copy.deepcopy((user_net.state_dict(), item_net.state_dict()))
                result.best_epoch = epoch
            else:
                stale += 1
        else:
            result.best_epoch = epoch
        record["seconds"] = round(time.perf_counter() - started, 2)
        result.history.append(record)
        log.info("epoch %d: %s", epoch, record)
        if stale >= cfg.patience:
            break
        if epoch + 1 < cfg.max_epochs and time.perf_counter() - started > cfg.max_train_seconds:
            log.warning(
                "two-tower training stopped at its time budget (%.0f s) after epoch %d of %d: "
                "the model now depends on this machine's speed and load",
                cfg.max_train_seconds,
                epoch,
                cfg.max_epochs,
            )
            result.stopped_at_time_budget = True
            break
    if best_state is not None:
        user_net.load_state_dict(best_state[0])
        item_net.load_state_dict(best_state[1])
    user_net.eval()
    item_net.eval()
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class _Batch:
    user_x: torch.Tensor  # (B, inputs)
    pos: torch.Tensor  # (B,) catalog rows
    uniform: torch.Tensor  # (M,)
    hard: torch.Tensor  # (B, H)
    hard_ok: torch.Tensor  # (B, H) bool
    hard_n: torch.Tensor  # (B,) how many hard negatives each row drew from
    weight: torch.Tensor  # (B,)


def _draw_hard(
    examples: Examples, idx: np.ndarray, h: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``h`` hard negatives per row, with replacement; rows without any are masked."""
    count = examples.neg_count[idx]
    ok = np.repeat((count > 0)[:, None], h, axis=1)
    if len(examples.neg_items) == 0:
        return np.zeros((len(idx), h), np.int64), np.zeros_like(ok), count
    pick = examples.neg_start[idx, None] + (rng.random((len(idx), h)) * count[:, None]).astype(
        np.int64
    )
    hard = examples.neg_items[np.minimum(pick, len(examples.neg_items) - 1)]
    return np.where(ok, hard, 0), ok, count


def _loss(
    user_net: UserTowerNet,
    item_net: ItemTowerNet,
    items: _Tensors,
    batch: _Batch,
    shared_count: torch.Tensor,
    keep_id: torch.Tensor,
) -> torch.Tensor:
    """Weighted sampled-softmax cross-entropy with logQ correction (see the module doc).

    Candidate columns: the batch's positives (B), the uniform negatives (M), then each
    row's own hard negatives (H). A candidate equal to the row's positive is masked.
    """
    B, H = batch.hard.shape
    M = len(batch.uniform)
    candidates = torch.cat([batch.pos, batch.uniform, batch.hard.reshape(-1)])
    emb = item_net(
        items.content[candidates],
        items.category[candidates],
        items.price_bucket[candidates],
        items.buckets[candidates],
        items.known[candidates] & keep_id,
    )
    u = user_net(batch.user_x)
    shared = candidates[: B + M]
    logits = u @ emb[: B + M].T - torch.log(shared_count[shared]).unsqueeze(0)
    same = batch.pos.unsqueeze(1) == shared.unsqueeze(0)
    same[:, :B].fill_diagonal_(False)
    columns = [logits.masked_fill(same, _MASK)]
    if H:
        hard_emb = emb[B + M :].reshape(B, H, -1)
        expected = shared_count[batch.hard] + H / batch.hard_n.clamp(min=1).unsqueeze(1)
        hard_logits = (u.unsqueeze(1) * hard_emb).sum(-1) - torch.log(expected)
        masked = ~batch.hard_ok | (batch.hard == batch.pos.unsqueeze(1))
        columns.append(hard_logits.masked_fill(masked, _MASK))
    ce = nn.functional.cross_entropy(torch.cat(columns, dim=1), torch.arange(B), reduction="none")
    return (ce * batch.weight).sum() / batch.weight.sum()


def validation_recall(
    user_net: UserTowerNet, item_net: ItemTowerNet, items: ItemInputs, valid: Validation, k: int
) -> float:
    user_net.eval()
    item_net.eval()
    item_emb = item_net.embed(items)
    with torch.no_grad():
        queries = user_net(torch.from_numpy(valid.user_x)).numpy()
    return recall_at_k(exact_top_k(queries, item_emb, k), valid.groups)
