"""Kubernetes mode: the pool's endpoints, objectives, model rewrites and leadership from the API server.

client.py       kubeconfig / in-cluster config → KubeClient (raw JSON over kubernetes_asyncio's session;
                rotating credentials and CA file re-read)
resources.py    where each kind lives in the API (paths)
models.py       the few fields we read of each kind, as msgspec Structs
backoff.py      exponential backoff with jitter
selector.py     label-selector syntax (labels.Parse): --endpoint-selector checked at start-up
informer.py     generic list-then-watch with resourceVersion, bookmarks, relist on 410; its metrics
pool.py         InferencePool / standalone selector + pods → datastore endpoints
discovery.py    the informers of pool and pods wired to pool.py; marks the datastore synced
objectives.py   InferenceObjective → flow control's ObjectiveStore
modelrewrite.py InferenceModelRewrite → rules with precedence; ModelRewriter for the director
leader.py       Lease-based leader election (client-go semantics)
runtime.py      everything above for one App: start, readiness, release, close
"""
