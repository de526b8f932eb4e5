"""``expflow pin …``: set, change, check and clear the PIN that guards irreversible acts."""

from __future__ import annotations

import json
import os
import sys

import typer

from expflow_flows.errors import ExpflowError

pin_app = typer.Typer(
    help="The PIN that guards destructive and irreversible acts.", no_args_is_help=True
)


def _ask_pin(given: str | None, prompt: str, *, env: bool = True, confirm: bool = False) -> str:
    """A PIN from the option, else EXPFLOW_PIN, else a prompt when a terminal is attached."""
    if given:
        return given
    if env and os.environ.get("EXPFLOW_PIN"):
        return os.environ["EXPFLOW_PIN"]
    if not sys.stdin.isatty():
        raise ExpflowError(
            f"{prompt.lower()} is needed: pass it as an option (no terminal to ask on)"
        )
    import getpass

    value = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass("Repeat: ") != value:
        raise ExpflowError("the two PINs differ")
    return value


@pin_app.command("init")
def pin_init(
    new_pin: str | None = typer.Option(None, "--new-pin", help="The new PIN (4-12 digits)."),
    pin: str | None = typer.Option(None, help="The current PIN, when one is set (or EXPFLOW_PIN)."),
) -> None:
    """Set the PIN; over an existing PIN this needs the current one."""
    from expflow_flows.governance import pin as pin_mod

    current = None
    if pin_mod.pin_status().get("set"):
        current = _ask_pin(pin, "Current PIN")
    fresh = _ask_pin(new_pin, "New PIN (4-12 digits)", env=False, confirm=True)
    pin_mod.init_pin(fresh, current=current)
    typer.echo(f"PIN set ({pin_mod.pin_path()}, mode 0600).")


@pin_app.command("change")
def pin_change(
    pin: str | None = typer.Option(None, help="The current PIN (or EXPFLOW_PIN)."),
    new_pin: str | None = typer.Option(None, "--new-pin", help="The new PIN (4-12 digits)."),
) -> None:
    """Replace the PIN (needs the current one)."""
    from expflow_flows.governance import pin as pin_mod

    if not pin_mod.pin_status().get("set"):
        raise ExpflowError("no PIN is set; use `expflow pin init`")
    current = _ask_pin(pin, "Current PIN")
    fresh = _ask_pin(new_pin, "New PIN (4-12 digits)", env=False, confirm=True)
    pin_mod.init_pin(fresh, current=current)
    typer.echo("PIN changed.")


@pin_app.command("check")
def pin_check(
    pin: str | None = typer.Option(None, help="The PIN to check (or EXPFLOW_PIN)."),
) -> None:
    """Check a PIN: exit 0 when right, 1 when wrong (wrong tries count towards the lockout)."""
    from expflow_flows.governance import pin as pin_mod

    if not pin_mod.pin_status().get("set"):
        raise ExpflowError("no PIN is set; use `expflow pin init`")
    ok = pin_mod.verify_pin(_ask_pin(pin, "PIN"))
    typer.echo("PIN is correct." if ok else "PIN is wrong.")
    if not ok:
        raise typer.Exit(1)


@pin_app.command("clear")
def pin_clear(
    pin: str | None = typer.Option(None, help="The current PIN (or EXPFLOW_PIN)."),
) -> None:
    """Remove the PIN (needs the current one); guarded acts are then allowed and still audited.

    Also the way out when pin.json went missing or was replaced: the PIN is then checked
    against the record kept in the ledger database.
    """
    from expflow_flows.governance import pin as pin_mod

    if not pin_mod.pin_status().get("set"):
        raise ExpflowError("no PIN is set")
    pin_mod.clear_pin(_ask_pin(pin, "Current PIN"))
    typer.echo("PIN cleared.")


@pin_app.command("status")
def pin_status() -> None:
    """Whether a PIN is set, where from, and whether the guard is locked (never the hash)."""
    from expflow_flows.governance import pin as pin_mod

    typer.echo(json.dumps(pin_mod.pin_status(), indent=2, default=str))
