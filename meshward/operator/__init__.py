"""The meshward operator: ``kopf run -m meshward.operator -A`` or ``meshward operator``.

It compiles each namespace's policy resources, Pods and Namespace into one document, the
``meshward-policy`` ConfigMap, and validates policy resources at admission. Settings come from
``MESHWARD_*`` environment variables (see :mod:`meshward.operator._settings`).
"""

from meshward.operator import _handlers as _handlers
