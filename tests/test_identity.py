"""Who is an admin: standalone servers, hub admins, admin users and groups, the hub role's scope."""

from __future__ import annotations

from jupyter_swapserve.service.identity import ADMIN_SCOPE, ANONYMOUS, AdminRule


def test_a_standalone_server_is_one_user_who_administers_it() -> None:
    assert AdminRule().identify("root").admin
    assert AdminRule().identify(None).name == ANONYMOUS
    # naming admins takes the right away from everyone else, on a standalone server too
    assert not AdminRule.of(users=["carol"]).identify("dave").admin
    assert AdminRule.of(users=["carol"]).identify("carol").admin


def test_hub_users_are_admins_by_flag_list_group_or_role_scope() -> None:
    rule = AdminRule.of(users=["carol"], groups=["staff"])
    assert not rule.identify("alice", ["students"], hub_admin=False).admin
    assert rule.identify("carol", hub_admin=False).admin
    assert rule.identify("bob", ["staff", "x"], hub_admin=False).admin
    assert rule.identify("root", hub_admin=True).admin
    assert not AdminRule.of(hub_admins=False).identify("root", hub_admin=True).admin
    assert rule.identify("erin", hub_admin=False, scopes=[ADMIN_SCOPE, "access:services"]).admin
    assert rule.identify("bob", ["x", "staff"], hub_admin=False).groups == ("staff", "x")
