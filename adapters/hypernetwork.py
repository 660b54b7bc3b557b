"""AUTOMATIC1111-compatible hypernetworks on a diffusers UNet: modules, attention processor, adapter.

A hypernetwork holds one pair of small MLPs (keys, values) per attention *context width*. In every
attention layer whose context width has a pair, the context becomes
``context + MLP(context) * multiplier`` separately before ``to_k`` and before ``to_v``; the query
is untouched. Self-attention layers use their hidden states as context, so their width is the
block's channel width; cross-attention layers see the text encoder's width.

Which widths a new hypernetwork gets (option ``sizes``): ``"all"`` (default) = every context
width of the base UNet, as A1111's default size list (768, 320, 640, 1280 for SD1) is the text
width plus every self-attention width; ``"cross"`` = only cross-attention widths, ``"self"`` =
only self-attention widths, or an explicit list of integers. On the testbed, ``"all"`` is
{32 (text, cross-attention), 64 (self-attention)}. When a self-attention width equals the text
width, one pair serves both kinds of layer (A1111 looks modules up by width alone).

It is installed with ``unet.set_attn_processor`` as :class:`HypernetworkAttnProcessor` and removed
by restoring the processors that were there before (:func:`install_hypernetwork` /
:func:`remove_hypernetwork`). The MLPs live outside the UNet's module tree, so the UNet's own
state dict never changes. Files: A1111 ``.pt`` and this project's safetensors form (see
``s2l_plugin.formats.hypernetwork_format``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from s2l_plugin.hooks import hookimpl

from s2l_plugin.config import check_choice, check_positive
from s2l_plugin.data import list_image_folder
from s2l_plugin.errors import ConfigError, FormatError
from s2l_plugin.formats.hypernetwork_format import (
    HypernetworkFile,
    HypernetworkSpec,
    check_widths,
    layer_plan,
    read_hypernetwork,
    sniff_hypernetwork,
    write_hypernetwork,
)

from .base import (
    Adapter,
    Artifact,
    TrainConfig,
    check_output_dir,
    list_files,
    publish,
    resolve_base,
    staging_dir,
)
from .dreambooth import write_training_record
from .textual_inversion import component_dtypes, restore_dtypes

SIZE_CHOICES = ("all", "cross", "self")
#: The attribute on a UNet that remembers an installed hypernetwork (and the processors it replaced).
_INSTALLED_ATTR = "_s2l_hypernetwork"


# -- modules ----------------------------------------------------------------------------------------


def _init_weights(module: Any, kind: str, activation: str, generator: Any) -> None:
    """A1111's initialisations: Normal = N(0, 0.01) weights and zero biases; Xavier/Kaiming with zero biases."""
    import torch

    init = torch.nn.init
    if kind == "Normal":
        init.normal_(module.weight, mean=0.0, std=0.01, generator=generator)
    elif kind == "XavierUniform":
        init.xavier_uniform_(module.weight, generator=generator)
    elif kind == "XavierNormal":
        init.xavier_normal_(module.weight, generator=generator)
    elif kind == "KaimingUniform":
        init.kaiming_uniform_(module.weight, nonlinearity="leaky_relu" if activation == "leakyrelu" else "relu", generator=generator)
    elif kind == "KaimingNormal":
        init.kaiming_normal_(module.weight, nonlinearity="leaky_relu" if activation == "leakyrelu" else "relu", generator=generator)
    init.zeros_(module.bias)


def build_mlp(spec: HypernetworkSpec, width: int, generator: Any = None) -> Any:
    """One A1111 ``HypernetworkModule``: ``x ↦ x + linear(x) * multiplier`` with ``linear`` an nn.Sequential
    laid out slot by slot as :func:`layer_plan` says (so its state dict has A1111's ``linear.{i}`` keys)."""
    import torch

    class HypernetworkModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            slots = []
            for kind, arg in layer_plan(spec, width):
                if kind == "linear":
                    layer = torch.nn.Linear(*arg)
                    _init_weights(layer, spec.weight_initialization, spec.activation_func, generator)
                    slots.append(layer)
                elif kind == "activation":
                    slots.append(getattr(torch.nn, arg)())
                elif kind == "layer_norm":
                    slots.append(torch.nn.LayerNorm(arg))
                else:
                    slots.append(torch.nn.Dropout(p=arg))
            self.linear = torch.nn.Sequential(*slots)

        def forward(self, x: Any, multiplier: float = 1.0) -> Any:
            return x + self.linear(x) * multiplier

    return HypernetworkModule()


def make_hypernetwork(spec: HypernetworkSpec, widths: list[int], *, seed: int = 0) -> Any:
    """A fresh hypernetwork (nn.Module) with a (k, v) MLP pair per width, initialised from ``seed``.

    ``module.layers[str(width)]`` is an nn.ModuleList ``[k_mlp, v_mlp]``; ``module.spec`` the spec.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleDict(
        {str(w): torch.nn.ModuleList([build_mlp(spec, w, generator), build_mlp(spec, w, generator)]) for w in sorted(set(widths))}
    )
    net.spec = spec
    return net


def hypernetwork_from_file(hn: HypernetworkFile) -> Any:
    """The nn.Module for a read file (strict state-dict load; shapes were validated by the reader)."""
    net = make_hypernetwork(hn.spec, hn.widths)
    for width, (k_state, v_state) in hn.layers.items():
        k_mlp, v_mlp = net.layers[str(width)]
        k_mlp.load_state_dict(k_state, strict=True)
        v_mlp.load_state_dict(v_state, strict=True)
    return net


def hypernetwork_to_file(net: Any, *, name: str, step: int, extra: dict[str, Any] | None = None) -> HypernetworkFile:
    """The :class:`HypernetworkFile` of a module (detached CPU copies of every tensor)."""
    layers = {
        int(w): tuple({k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in pair)
        for w, pair in net.layers.items()
    }
    return HypernetworkFile(spec=net.spec, layers=layers, name=name, step=step, extra=dict(extra or {}))  # type: ignore[arg-type]


# -- the attention processor -------------------------------------------------------------------------


def attention_context_widths(unet: Any) -> dict[str, tuple[int, bool]]:
    """Processor name → (context width = ``attn.to_k.in_features``, is cross-attention), for every attention layer."""
    from diffusers.models.attention_processor import Attention

    return {
        f"{name}.processor": (int(module.to_k.in_features), bool(module.is_cross_attention))
        for name, module in unet.named_modules()
        if isinstance(module, Attention)
    }


class HypernetworkAttnProcessor:
    """Scaled-dot-product attention (as diffusers' ``AttnProcessor2_0``) with the hypernetwork applied to
    the context: keys from ``k_mlp(context)``, values from ``v_mlp(context)``; queries unchanged.

    A plain object (not an nn.Module), so installing it adds nothing to the UNet's state dict.
    """

    def __init__(self, k_mlp: Any, v_mlp: Any, multiplier: float = 1.0) -> None:
        self.k_mlp, self.v_mlp, self.multiplier = k_mlp, v_mlp, multiplier

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        # The hypernetwork's whole effect: separate residual MLPs before the key and value projections.
        # The MLPs run in their own dtype (fp32 while a frozen UNet runs in bf16/fp16).
        mlp_dtype = self.k_mlp.linear[0].weight.dtype
        key = attn.to_k(self.k_mlp(context.to(mlp_dtype), self.multiplier).to(context.dtype))
        value = attn.to_v(self.v_mlp(context.to(mlp_dtype), self.multiplier).to(context.dtype))
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_hypernetwork(unet: Any, net: Any, *, multiplier: float = 1.0, source: str = "hypernetwork") -> list[str]:
    """Install ``net`` on every attention layer of ``unet`` whose context width has a module; returns those processor names.

    FormatError naming both widths when a module's width is no context width of ``unet``. A
    hypernetwork already installed is removed first (one at a time, as in A1111's single slot).
    """
    remove_hypernetwork(unet)
    widths = attention_context_widths(unet)
    check_widths([int(w) for w in net.layers], [w for w, _ in widths.values()], source=source)
    original = dict(unet.attn_processors)
    new = dict(original)
    hit = []
    for name, (width, _) in widths.items():
        if str(width) in net.layers:
            k_mlp, v_mlp = net.layers[str(width)]
            new[name] = HypernetworkAttnProcessor(k_mlp, v_mlp, multiplier)
            hit.append(name)
    net.to(device=unet.device)
    unet.set_attn_processor(new)
    setattr(unet, _INSTALLED_ATTR, (net, original))
    return hit


def installed_hypernetwork(unet: Any) -> Any:
    """The hypernetwork module installed on ``unet`` (None when there is none)."""
    found = getattr(unet, _INSTALLED_ATTR, None)
    return found[0] if found else None


def remove_hypernetwork(unet: Any) -> bool:
    """Restore the processors that were in place before :func:`install_hypernetwork`; False when none was installed."""
    found = getattr(unet, _INSTALLED_ATTR, None)
    if not found:
        return False
    unet.set_attn_processor(found[1])
    setattr(unet, _INSTALLED_ATTR, None)
    return True


def context_widths_for(unet: Any, sizes: Any) -> list[int]:
    """The widths a new hypernetwork gets for option ``sizes`` ("all" | "cross" | "self" | list of ints)."""
    widths = attention_context_widths(unet).values()
    if isinstance(sizes, str):
        check_choice("sizes", sizes, SIZE_CHOICES)
        chosen = sorted({w for w, cross in widths if sizes == "all" or cross == (sizes == "cross")})
        if not chosen:
            raise ConfigError(f"sizes={sizes!r} selects no attention layer of this UNet; its context widths are {sorted({w for w, _ in widths})}")
        return chosen
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ConfigError(f"sizes={sizes!r} is not valid; expected 'all', 'cross', 'self' or a non-empty list of integers")
    try:
        check_widths(sizes, [w for w, _ in widths], source="sizes option")
    except FormatError as exc:
        raise ConfigError(str(exc)) from exc
    return sorted(set(sizes))


# -- the adapter -------------------------------------------------------------------------------------


class HypernetworkAdapter(Adapter):
    """``hypernetwork``: train A1111-style hypernetwork MLPs; everything in the base model stays frozen."""

    name = "hypernetwork"
    default_options: dict[str, Any] = {
        "name": "s2l",
        "sizes": "all",
        "layer_structure": [1, 2, 1],
        "activation_func": "linear",
        "is_layer_norm": False,
        "weight_initialization": "Normal",
        "use_dropout": False,
        "dropout_structure": None,
        "last_layer_dropout": False,
        "activate_output": False,
        "multiplier": 1.0,
    }
    script_kinds: tuple[str, ...] = ()

    def spec_from_options(self, options: dict[str, Any]) -> HypernetworkSpec:
        return HypernetworkSpec(
            layer_structure=options["layer_structure"],
            activation_func=options["activation_func"],
            is_layer_norm=options["is_layer_norm"],
            weight_initialization=options["weight_initialization"],
            use_dropout=options["use_dropout"],
            dropout_structure=options["dropout_structure"],
            last_layer_dropout=options["last_layer_dropout"],
            activate_output=options["activate_output"],
        )

    #: what `s2l finetune` uses without --lr (A1111's default hypernetwork learning rate)
    default_learning_rate = 1e-5

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options merged over the defaults; ConfigError for an unknown key or a bad value (before any model loads)."""
        options = self.validate_options(options)
        self.spec_from_options(options)
        sizes = options["sizes"]
        if isinstance(sizes, str):
            check_choice("sizes", sizes, SIZE_CHOICES)
        elif not isinstance(sizes, (list, tuple)) or not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ConfigError(f"sizes={sizes!r} is not valid; expected 'all', 'cross', 'self' or a non-empty list of positive integers")
        check_positive("multiplier", options["multiplier"], allow_zero=True)
        if not isinstance(options["name"], str) or not options["name"].strip() or "/" in options["name"]:
            raise ConfigError(f"name={options['name']!r} is not valid; expected a non-empty file-name-safe string")
        return options

    def train(self, base: Any, dataset_dir: Path, config: TrainConfig, output_dir: Path) -> Artifact:
        """Train a new hypernetwork on ``base`` (a pipeline, changed in place: it ends with the trained
        hypernetwork installed) and write ``<name>.safetensors`` and ``<name>.pt`` into ``output_dir``."""
        from .training import Trainable, train_loop

        options = self.check_options(config.options)
        spec = self.spec_from_options(options)
        pipe, base_path = resolve_base(base)
        output_dir = check_output_dir(output_dir)
        records = list_image_folder(dataset_dir, caption=None if config.caption_from_data else config.prompt)
        widths = context_widths_for(pipe.unet, options["sizes"])
        net = make_hypernetwork(spec, widths, seed=config.seed)
        install_hypernetwork(pipe.unet, net, multiplier=1.0)
        net.train()  # dropout on while training, as A1111
        dtypes = component_dtypes(pipe)
        try:
            result = train_loop(
                pipe, records, config, Trainable(parameters=list(net.parameters()), extra_modules={"hypernetwork": net}),
                output_dir=output_dir, fingerprint_extra={"method": self.name, "options": options},
            )
        except BaseException:
            remove_hypernetwork(pipe.unet)  # a failed run leaves the base pipeline as it was given
            raise
        finally:
            net.eval()
            restore_dtypes(pipe, dtypes)
        for mlp_pair in net.layers.values():
            for mlp in mlp_pair:
                mlp.requires_grad_(False)
        # The trained pipeline applies the multiplier the artifact will be loaded with.
        install_hypernetwork(pipe.unet, net, multiplier=float(options["multiplier"]))
        name = options["name"]
        hn = hypernetwork_to_file(net, name=name, step=result.global_step)
        staging = staging_dir(output_dir)
        write_hypernetwork(hn, staging / f"{name}.safetensors")
        write_hypernetwork(hn, staging / f"{name}.pt")
        write_training_record(staging, self.name, config, options, result, base_path)
        names = publish(staging, output_dir)
        return Artifact(
            method=self.name, path=output_dir, files=list_files(output_dir, names), base=base_path,
            metadata={"name": name, "widths": hn.widths, "multiplier": float(options["multiplier"]),
                      "global_step": result.global_step, "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                      "losses": result.losses, "options": options},
        )

    def script_args(self, script_kind: str, data_dir: Path, prompt: str, output_dir: Path) -> dict[str, str | None]:
        raise ConfigError(
            f"script kind {script_kind!r} is not valid for method 'hypernetwork': no diffusers or kohya script trains "
            "hypernetworks (sd-scripts dropped it); use the built-in trainer (s2l finetune --method hypernetwork)"
        )

    def _file_of(self, artifact: Artifact) -> Path:
        path = Path(artifact.path)
        if path.is_file():
            return path
        names = [f for f in artifact.files if f.endswith(".safetensors")] + [f for f in artifact.files if f.endswith(".pt")]
        for name in names:
            if (path / name).is_file():
                return path / name
        found = self.detect(path)
        if found is None:
            raise FormatError(f"no hypernetwork file in {str(path)!r}; expected <name>.safetensors or an A1111 <name>.pt")
        return self._file_of(found)

    def load(self, base_pipeline: Any, artifact: Artifact, *, allow_pickle: bool | None = None) -> Any:
        """Install the artifact's hypernetwork on ``base_pipeline`` (in place) and return it.

        The safetensors form is preferred; an A1111 ``.pt`` is read weights-only, and only when
        ``allow_pickle`` (default: the artifact's ``metadata["allow_pickle"]``, else False).
        FormatError naming both numbers when a module width is no context width of the UNet.
        """
        file = self._file_of(artifact)
        if allow_pickle is None:
            allow_pickle = bool(artifact.metadata.get("allow_pickle", False))
        hn = read_hypernetwork(file, allow_pickle=allow_pickle)
        net = hypernetwork_from_file(hn)
        net.eval()
        net.requires_grad_(False)
        install_hypernetwork(base_pipeline.unet, net, multiplier=float(artifact.metadata.get("multiplier", 1.0)), source=str(file))
        return base_pipeline

    def unload(self, pipeline: Any, artifact: Artifact) -> Any:
        """Restore the UNet's original attention processors."""
        remove_hypernetwork(pipeline.unet)
        return pipeline

    def detect(self, output_dir: Path) -> Artifact | None:
        """A folder's hypernetwork, found by content: a ``*.safetensors`` carrying this format's header marker.

        A1111 ``.pt`` files are pickles and are not opened to sniff them; point an Artifact at one
        and load it with ``allow_pickle=True`` instead.
        """
        output_dir = Path(output_dir)
        if not output_dir.is_dir():
            return None
        for file in sorted(output_dir.glob("*.safetensors")):
            if sniff_hypernetwork(file):
                pt = file.with_suffix(".pt")
                return Artifact(method=self.name, path=output_dir, files=[file.name] + ([pt.name] if pt.is_file() else []),
                                metadata={"name": file.stem})
        return None


@hookimpl
def register_adapters(register: Any) -> None:
    register(HypernetworkAdapter())
