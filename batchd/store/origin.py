"""What a finished batch's lines showed it to be (`batches.origin`, design step 7): the one
rule both stores' settle modules apply to what they counted in their own SQL."""

from __future__ import annotations

from dataclasses import dataclass

from batchd.domain import BatchOrigin


@dataclass(frozen=True, slots=True)
class LinesSeen:
    """What the finishing transaction counted of a batch's lines and members."""

    matched: int  # lines that named a task of the batch's intent (the collector's count)
    unmatched: int  # lines kept in unmatched_results
    ours: int  # of those, lines naming a task of ours outside the intent
    malformed: int  # of those, `malformed-line-N`: they name nobody
    # The intent claimed tasks: batch_tasks rows (a user's DELETE leaves them), or tasks
    # still in the batch whose membership an edit of their request ended (migration 016).
    has_members: bool
    has_live_members: bool  # some of those tasks still exist, still members (unchanged)


def batch_origin(lines: LinesSeen) -> BatchOrigin:
    """Foreign only when no line named a task of its intent, some lines were kept
    unmatched, none of those names any task of ours, none is malformed (a malformed line
    names nobody: it proves nothing foreign), and the intent's tasks are not all gone.

    An intent whose tasks existed and were all DELETEd by the user while its batch was in
    flight (a supported delete: batch_tasks has no foreign key) is ours with its tasks
    deleted: no line can name a task that no longer exists, which proves nothing about the
    key. Its lines stay kept (partly ours: lines no task holds), and paid is counted. The
    same when the user renamed them (an UPDATE of custom_id, in flight): its lines name
    custom_ids no task holds any more, which proves nothing either.
    """
    if not lines.unmatched:
        return BatchOrigin.OURS
    tasks_deleted = lines.has_members and not lines.has_live_members
    if lines.matched == 0 and not lines.ours and not lines.malformed and not tasks_deleted:
        return BatchOrigin.FOREIGN
    return BatchOrigin.PARTLY_OURS
