"""kohya sd-scripts' train_network.py with S2L, for an in-house kohya pipeline (one environment).

Put this file in your sd-scripts folder (beside train_network.py) and run it as you run
train_network.py, with the S2L options added:

    python s2l_train_network.py <train_network.py arguments> \
        --s2l-domain "Joe Biden" --s2l-audit members=private/members,nonmembers=private/nonmembers

Before kohya's own ``train(args)``, the synthetic set is generated in kohya's ``<repeats>_<name>/``
layout with captions in ``--caption_extension`` and ``args.train_data_dir`` (or a copy of
``--dataset_config``) points at it; after it, ``{output_name or "last"}.safetensors`` is audited and
the report written to OUTPUT_DIR/s2l-report/. This needs s2l-plugin installed in kohya's environment;
when the two cannot share one, use ``s2l launch --python KOHYA_PYTHON -- train_network.py …`` instead.
For SDXL, subclass ``sdxl_train_network.SdxlNetworkTrainer`` and use ``sdxl_train_network.setup_parser``.
"""

import train_network

import s2l_plugin
from s2l_plugin.kohya import S2LNetworkTrainerMixin


class S2LNetworkTrainer(S2LNetworkTrainerMixin, train_network.NetworkTrainer):
    """kohya's NetworkTrainer, with S2L generation before ``train(args)`` and the audit after it."""


if __name__ == "__main__":
    parser = train_network.setup_parser()
    s2l_plugin.add_arguments(parser)  # the --s2l-* options
    args = parser.parse_args()
    # kohya's own main also runs train_util.verify_command_line_training_args(args) and
    # args = train_util.read_config_from_file(args, parser) here; keep them in yours.
    trainer = S2LNetworkTrainer()
    trainer.train(args)
