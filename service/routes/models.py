"""OpenAI-compatible model listing: /v1/models and /v1/models/{id} (the base model and every loaded adapter)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..errors import NotFoundError
from .deps import ApiAuth, Components, Deps

__all__ = ["card_named", "model_card", "router"]

router = APIRouter(dependencies=[ApiAuth], tags=["openai"])


def model_card(name: str, created: int, parent: str | None, kind: str | None = None) -> dict[str, Any]:
    """One entry of `/v1/models` (OpenAI's Model object, plus `root`, `parent` and the model's `kind`)."""
    card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "lokr-serve"}
    card.update(root=name, parent=parent)  # root is the name, not a path: where adapters live is the admin API's
    return card if kind is None else {**card, "kind": kind}


def _model_cards(c: Components) -> list[dict[str, Any]]:
    base = c.settings.base_name
    kind = c.engine.backend.kind if c.engine is not None else None
    cards = [model_card(base, c.created, None, kind)]
    if c.registry is not None:
        cards.extend(model_card(r.name, int(r.loaded_at), base, kind) for r in c.registry.records())
    return cards


@router.get("/v1/models")
async def list_models(c: Deps) -> dict[str, Any]:
    """The base model under its served name (created: when the server started), and every loaded adapter (parent =
    base, created: when it was loaded), with the model's kind."""
    return {"object": "list", "data": _model_cards(c)}


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, c: Deps) -> dict[str, Any]:
    """One entry of `/v1/models` (OpenAI's `models.retrieve`); 404 if no model or adapter has that name."""
    return card_named(_model_cards(c), model_id)


def card_named(cards: list[dict[str, Any]], model_id: str) -> dict[str, Any]:
    """The card of `model_id` among `cards`; NotFoundError (404) if none."""
    for card in cards:
        if card["id"] == model_id:
            return card
    message = f"no model or adapter named {model_id!r}; GET /v1/models lists what is served"
    raise NotFoundError(message, code="model_not_found")
