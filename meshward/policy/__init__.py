"""The shared policy model: pure Python, no I/O.

    resources   the CRDs as pydantic models (what users write)
    workload    what policy needs from Pods and Namespaces
    compile     namespace state -> compiled document + status conditions
    compiled    the compiled document (ConfigMap ``meshward-policy``), its schema and hash
    decision    compiled document + destination + client (+ request) -> allow/deny and the rule

Data flows one way, top to bottom; the operator and the proxies meet only at ``compiled``.
"""
