"""The layers: state and parameters only; every pass goes through :mod:`cupysyncbn.functional`.

* :mod:`.layer`: ``Layer``, ``Parameter``, ``ParamAttr`` (a small ``paddle.nn.Layer``);
* :mod:`.container`: ``Sequential``, ``LayerList``;
* :mod:`.norm`: ``SyncBatchNorm``, ``BatchNorm1D/2D/3D``;
* :mod:`.grads`: ``allreduce_gradients``.
"""
