"""The online-prompt service: HTTP API schema, request validation, batching and the Ray Serve deployments.

Torch-free modules (``schema``, ``validation``, ``batching``, ``responses``, ``api``) run in the ingress;
``engine`` holds the pipeline in the generator replica; ``deployments`` and ``server`` wire them into Ray Serve.
"""
