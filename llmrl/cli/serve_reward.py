"""``llmrl serve-reward`` / ``python launch/serve_reward.py --config C``: a config's reward over HTTP."""
from __future__ import annotations

import os

from llmrl.errors import ConfigError
from llmrl.rewards.server import make_server


def main(argv: list[str] | None = None) -> int:
    from llmrl.cli.console import config_parser, run_cli

    parser = config_parser("Serve a config's reward over HTTP (POST /score, GET /health).",
                           "a training config (any algorithm); its reward section is served")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token to require")
    args = parser.parse_intermixed_args(argv)

    def body():
        from llmrl.config import load_config
        from llmrl.rewards.base import build_reward

        cfg = load_config(args.config, args.overrides)
        token = None
        if args.token_env:
            token = os.environ.get(args.token_env)
            if not token:
                raise ConfigError(f"--token-env {args.token_env!r} is not set in the environment: export it")
        reward = build_reward(cfg.reward)
        server = make_server(reward, args.host, args.port, token)
        host, port = server.server_address[:2]
        print(f"serving reward {reward.name!r} on http://{host}:{port}/score"
              f"{' (bearer token required)' if token else ''}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    return run_cli(body)
