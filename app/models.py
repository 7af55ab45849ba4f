"""Every table, imported in one place so Alembic and the tests see the whole schema."""

from app.audit.models import AuditEvent
from app.auth.models import ApiToken, LoginAttempt, Role, User, UserKind, UserSession
from app.campaigns.models import Campaign, CampaignGuidelines, CampaignMode, CampaignStatus
from app.db import Base
from app.exports.models import ExportSnapshot
from app.jobs.models import Job, JobMetric, JobState, ModelKind, ModelVersion
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Comparison,
    ComparisonSource,
    Completion,
    CompletionSource,
    Judgment,
    Prompt,
    Task,
    TaskCompletion,
    TaskStatus,
)
from app.loop.models import AuditPair, LoopIteration, LoopState, PolicyLoop, Stage
from app.quality.models import LabelerExclusion, QualityReport

__all__ = [
    "ApiToken",
    "Assignment",
    "AssignmentState",
    "AuditEvent",
    "AuditPair",
    "Base",
    "Campaign",
    "CampaignGuidelines",
    "CampaignMode",
    "CampaignStatus",
    "Comparison",
    "ComparisonSource",
    "Completion",
    "CompletionSource",
    "ExportSnapshot",
    "Job",
    "JobMetric",
    "JobState",
    "Judgment",
    "LabelerExclusion",
    "LoginAttempt",
    "LoopIteration",
    "LoopState",
    "ModelKind",
    "ModelVersion",
    "PolicyLoop",
    "Prompt",
    "QualityReport",
    "Role",
    "Stage",
    "Task",
    "TaskCompletion",
    "TaskStatus",
    "User",
    "UserKind",
    "UserSession",
]
