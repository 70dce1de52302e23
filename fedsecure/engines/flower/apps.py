"""The Flower app objects: ``fedsecure.engines.flower.apps:server_app`` and ``:client_app``.

These are the components named in the Flower App template
(``fedsecure/engines/flower/app_template/pyproject.toml``); ``flwr run`` builds a FAB from it,
the SuperLink runs :data:`server_app` (fedsecure's server step as the ServerApp's loop, see
:mod:`fedsecure.engines.flower.engine`) and every SuperNode runs :data:`client_app` (the
client step, see :mod:`fedsecure.engines.flower.node`). This module imports only Flower at
load time: each message is handled by a fresh ClientApp process, and a light stage (a key
exchange) does not pay for loading the model.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the scenario of ``context.run_config`` with its clients on the connected SuperNodes."""
    from fedsecure.engines.flower.engine import serve

    serve(grid, context)


@client_app.query("fedsecure_hello")
def hello(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_hello

    return handle_hello(message, context)


@client_app.train("fedsecure_round")
def train(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_train

    return handle_train(message, context)


@client_app.query("fedsecure_secagg_advertise")
def secagg_advertise(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_secagg_advertise

    return handle_secagg_advertise(message, context)


@client_app.query("fedsecure_secagg_share")
def secagg_share(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_secagg_share

    return handle_secagg_share(message, context)


@client_app.query("fedsecure_secagg_unmask")
def secagg_unmask(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_secagg_unmask

    return handle_secagg_unmask(message, context)


@client_app.query("fedsecure_ckks_keygen")
def ckks_keygen(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_ckks_keygen

    return handle_ckks_keygen(message, context)


@client_app.query("fedsecure_ckks_decrypt")
def ckks_decrypt(message: Message, context: Context) -> Message:
    from fedsecure.engines.flower.node import handle_ckks_decrypt

    return handle_ckks_decrypt(message, context)
