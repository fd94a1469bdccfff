"""Who is asking: a user name, whether they administer the service, and their groups.

Built by the Jupyter handlers from jupyter_server's user (or JupyterHub's user model in hub
service mode); the core only ever sees this small value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: the user of a server without JupyterHub that has no user name (token-only servers)
ANONYMOUS = "anonymous"
#: a JupyterHub custom scope: a hub role granting it makes its holders admins of the swap service
ADMIN_SCOPE = "custom:swapserve:admin"


@dataclass(frozen=True)
class Identity:
    name: str
    admin: bool = False
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminRule:
    """Who is an admin. Without a hub the server belongs to one user, who administers it."""

    admin_users: frozenset[str] = field(default_factory=frozenset)
    admin_groups: frozenset[str] = field(default_factory=frozenset)
    hub_admins_are_admins: bool = True

    @classmethod
    def of(cls, users: Iterable[str] = (), groups: Iterable[str] = (), hub_admins: bool = True) -> AdminRule:
        return cls(frozenset(users), frozenset(groups), hub_admins)

    def identify(self, name: str | None, groups: Iterable[str] = (), hub_admin: bool | None = None,
                 scopes: Iterable[str] = ()) -> Identity:
        """``hub_admin`` is None when no hub vouches for the user: a standalone server belongs to one
        user, who administers it unless ``admin_users``/``admin_groups`` name someone else."""
        user = name or ANONYMOUS
        group_tuple = tuple(sorted(set(groups)))
        if hub_admin is None and not self.admin_users and not self.admin_groups:
            admin = True
        else:
            admin = (
                user in self.admin_users
                or bool(self.admin_groups.intersection(group_tuple))
                or (self.hub_admins_are_admins and bool(hub_admin))
                or ADMIN_SCOPE in set(scopes)
            )
        return Identity(user, admin, group_tuple)
