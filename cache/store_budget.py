"""The byte budget and eviction: which entries go, and when a budget may change.

Rules (issue 14, "budgets that do not destroy"):

* the manifest's byte total never exceeds the budget; victims are chosen by the policy (LRU, the
  paper's; LFU; FIFO), whose order lives in the manifest, so it survives restarts;
* a pinned entry is never a victim; its bytes still count against the budget, so a budget below
  the pinned bytes is refused (:class:`PinnedError`) and an entry that would only fit by evicting
  a pinned one is not stored (:class:`EntryTooLargeError`, saying how many bytes are pinned);
* an entry larger than the whole budget is not stored (:class:`EntryTooLargeError`), and nothing
  is evicted for it;
* lowering the budget below what the store holds is refused (:class:`BudgetError`, saying how many
  entries and bytes would go) unless the caller confirms with ``evict_to_fit``; then saving the new
  budget and evicting happen in one transaction.

Every function here runs inside a manifest transaction ``c`` that the caller holds under the
store's writer lock; deleting the victims' files is the caller's, after the commit.
"""

from __future__ import annotations

import numpy as np

from .policy import EvictionPolicy
from .store_manifest import Manifest, pinned_bytes
from .store_types import MAX_BUDGET_BYTES, MAX_ENTRY_BYTES, BudgetError, EntryTooLargeError, PinnedError

__all__ = ["validate_budget", "check_entry_fits", "pick_victims", "evict", "budget_error", "change_budget",
           "victims_for_entry"]


def validate_budget(budget) -> int:
    """The budget as an int of bytes.

    Raises:
        ValueError: not a whole number of bytes in 1..MAX_BUDGET_BYTES (1 PiB).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 0 < budget <= MAX_BUDGET_BYTES:
        raise ValueError(f"budget must be a positive number of bytes (a whole number, at most {MAX_BUDGET_BYTES:,} = 1 PiB), got {budget!r}")
    return int(budget)


def check_entry_fits(nbytes: int, budget: int) -> None:
    """Raise :class:`EntryTooLargeError` when one entry of ``nbytes`` can never be stored."""
    if nbytes > budget or nbytes > MAX_ENTRY_BYTES:
        limit = min(budget, MAX_ENTRY_BYTES)
        raise EntryTooLargeError(
            f"this entry is {nbytes:,} bytes, more than the store's whole budget of {budget:,} bytes"
            + (f" (or the {MAX_ENTRY_BYTES:,}-byte cap on one entry)" if nbytes > MAX_ENTRY_BYTES else "")
            + "; it is not stored. Raise the budget (budget_bytes / --budget-mb) to cache requests of this size",
            nbytes, limit)


def pick_victims(c, policy: EvictionPolicy, excess: int) -> list[tuple[int, int]]:
    """The entries to evict, in policy order, until ``excess`` bytes are freed: [(entry id, bytes)].
    Pinned entries are never chosen, so fewer than ``excess`` bytes may be freed (see
    :func:`victims_for_entry`)."""
    if excess <= 0:
        return []
    victims, freed = [], 0
    for entry_id, nbytes in c.execute(f"SELECT id, nbytes FROM entries WHERE pinned=0 ORDER BY {policy.order_by}"):
        victims.append((int(entry_id), int(nbytes)))
        freed += int(nbytes)
        if freed >= excess:
            break
    return victims


def victims_for_entry(c, policy: EvictionPolicy, nbytes: int, budget: int, folder: str = "") -> list[tuple[int, int]]:
    """The victims that make room for a new entry of ``nbytes`` under ``budget`` (policy order).

    The pinned bytes are summed (one scan) only when the unpinned entries cannot free enough, so
    an ordinary insert stays O(victims).

    Raises:
        EntryTooLargeError: the entry would fit only by evicting pinned entries; nothing is evicted.
    """
    excess = Manifest.bytes_held(c) + nbytes - budget
    victims = pick_victims(c, policy, excess)
    if sum(v[1] for v in victims) < excess:
        pinned = pinned_bytes(c)
        raise EntryTooLargeError(
            f"this entry is {nbytes:,} bytes, but pinned entries hold {pinned:,} of the store {folder}'s "
            f"{budget:,}-byte budget and are never evicted; it is not stored. Unpin entries "
            "(`cache unpin STORE ID`) or raise the budget", nbytes, budget - pinned)
    return victims


def evict(c, victims: list[tuple[int, int]], generation: int) -> None:
    """Delete the victims' rows at ``generation`` and count them as evictions."""
    if victims:
        Manifest.delete_entries(c, [v[0] for v in victims], generation)
        c.execute("UPDATE counters SET value=value+? WHERE name='evictions'", (len(victims),))


def budget_error(location: str, budget: int, held: int, count: int, freed: int, policy: EvictionPolicy) -> BudgetError:
    """The :class:`BudgetError` of a budget that would evict ``count`` entries (``freed`` bytes) of a
    store at ``location`` holding ``held`` bytes: says what would go and how to confirm it."""
    return BudgetError(
        f"the store {location} holds {held:,} bytes; a budget of {budget:,} bytes would evict {count} "
        f"entries ({freed:,} bytes, {EvictionPolicy.parse(policy).value} order). Nothing was changed: confirm with "
        "--evict-to-fit (the CHAI Cache node's evict_to_fit option, or evict_to_fit=True), or keep a larger budget",
        budget, held, count, freed)


def change_budget(c, budget: int, policy: EvictionPolicy, evict_to_fit: bool, folder: str = "") -> list[int]:
    """Save a new budget; evict down to it only when ``evict_to_fit`` (same transaction).

    Returns:
        The evicted entry ids (their files are the caller's to delete after the commit).

    Raises:
        PinnedError: ``budget`` is below the bytes of the pinned entries (never evicted), even
            with ``evict_to_fit``; nothing is saved or evicted.
        BudgetError: the store holds more than ``budget`` and ``evict_to_fit`` is False; nothing
            is saved or evicted.
    """
    pinned = pinned_bytes(c)
    if budget < pinned:
        raise PinnedError(
            f"a budget of {budget:,} bytes is smaller than the {pinned:,} bytes of the pinned entries of the store "
            f"{folder}, which are never evicted. Nothing was changed: unpin entries first (`cache unpin STORE ID`) "
            f"or keep a budget of at least {pinned:,} bytes")
    held = Manifest.bytes_held(c)
    victims = pick_victims(c, policy, held - budget)
    if victims and not evict_to_fit:
        raise budget_error(folder, budget, held, len(victims), sum(v[1] for v in victims), policy)
    c.execute("INSERT OR REPLACE INTO meta VALUES('budget_bytes', ?)", (str(budget),))
    if victims:
        evict(c, victims, Manifest.bump_generation(c))
    return [v[0] for v in victims]
