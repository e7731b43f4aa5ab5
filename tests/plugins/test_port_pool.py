"""Contract §6 over HTTP: every route, status and message of the network pool, the
validation of every field, and the pool surviving a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from lightd.interfaces import PORT_POOL, PortRequest
from lightd.plugins.port_pool.model import ip_key

from ..conftest import MASTER, RunningAgent, StartAgent, api_client

MAX = 65535


async def add(client: httpx.AsyncClient, ip: str, port: int, protocol: str | None = None) -> None:
    body: dict[str, Any] = {"ip": ip, "port": port}
    if protocol is not None:
        body["protocol"] = protocol
    response = await client.post("/network/ports", json=body)
    assert response.status_code == 200, response.text


async def pool(client: httpx.AsyncClient, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/network/ports{query}")
    assert response.status_code == 200, response.text
    ports: list[dict[str, Any]] = response.json()["ports"]
    return ports


def keys(ports: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(p["ip"], p["port"]) for p in ports]


def assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == message
    assert body["code"].replace("_", "").isalpha()


# --- POST /network/ports ------------------------------------------------------------


async def test_add_port_answers_the_documented_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/network/ports", json={"ip": "10.0.0.5", "port": 25565, "protocol": "udp"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "Port added to pool",
        "ip": "10.0.0.5",
        "port": 25565,
        "protocol": "udp",
    }
    assert await pool(client) == [
        {"ip": "10.0.0.5", "port": 25565, "protocol": "udp", "in_use": False, "container": None}
    ]


async def test_add_port_protocols(client: httpx.AsyncClient) -> None:
    for port, protocol in enumerate([None, "tcp", "udp", "both"], start=1):
        body: dict[str, Any] = {"ip": "10.0.0.5", "port": port}
        if protocol is not None:
            body["protocol"] = protocol
        response = await client.post("/network/ports", json=body)
        assert response.status_code == 200
        assert response.json()["protocol"] == (protocol or "tcp")
    assert [p["protocol"] for p in await pool(client)] == ["tcp", "tcp", "udp", "both"]


async def test_add_port_null_protocol_means_tcp(client: httpx.AsyncClient) -> None:
    response = await client.post("/network/ports", json={"ip": "::", "port": 1, "protocol": None})
    assert response.json()["protocol"] == "tcp"


NORMALISED = [
    ("10.0.0.1", "10.0.0.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("::1", "::1"),
    ("::", "::"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("[2001:db8::7]", "2001:db8::7"),
    ("::ffff:10.0.0.9", "10.0.0.9"),
]


async def test_add_port_normalises_the_address(client: httpx.AsyncClient) -> None:
    for port, (given, stored) in enumerate(NORMALISED, start=1):
        response = await client.post("/network/ports", json={"ip": given, "port": port})
        assert response.status_code == 200, response.text
        assert response.json()["ip"] == stored, given
    assert keys(await pool(client)) == sorted(
        [(stored, port) for port, (_, stored) in enumerate(NORMALISED, start=1)],
        key=lambda k: (ip_key(k[0]), k[1]),
    )


BAD_IPS = [
    ("999.1.1.1", "999.1.1.1"),
    ("10.0.0", "10.0.0"),
    ("010.0.0.1", "010.0.0.1"),
    ("10.0.0.1/32", "10.0.0.1/32"),
    (" 10.0.0.1", " 10.0.0.1"),
    ("localhost", "localhost"),
    ("fe80::1%eth0", "fe80::1%eth0"),
    ("2001:db8::g", "2001:db8::g"),
    ("", ""),
    (167772161, "167772161"),
    (None, "null"),
    (True, "true"),
    (["10.0.0.1"], '["10.0.0.1"]'),
    ("1" * 300, "1" * 100 + "…"),
]
BAD_PORTS = [(0, "0"), (-1, "-1"), (65536, "65536")]
#: Not a JSON integer at all: the field form of contract §1, not "Invalid port".
WRONG_TYPE_PORTS: list[object] = ["80", 80.0, 80.5, True, None, {}, [1]]
BAD_PROTOCOLS = [("TCP", "TCP"), ("icmp", "icmp"), ("", ""), ("tcp ", "tcp "), (6, "6")]


BAD_BODIES: list[tuple[dict[str, Any], int, str]] = [
    ({"json": {}}, 400, "ip: is required"),
    ({"json": {"ip": "10.0.0.1"}}, 400, "port: is required"),
    ({"json": {"port": 80}}, 400, "ip: is required"),
    ({"json": [{"ip": "10.0.0.1", "port": 80}]}, 400, "Body must be a JSON object"),
    (
        {"content": b"{nope", "headers": {"Content-Type": "application/json"}},
        400,
        "Invalid JSON body",
    ),
    (
        {"content": b"ip=10.0.0.1", "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type must be application/json",
    ),
]


async def test_add_port_validates_every_field(client: httpx.AsyncClient) -> None:
    """Each bad value gets the contract's message, and nothing is added."""
    cases: list[tuple[dict[str, Any], int, str]] = [
        *[
            ({"json": {"ip": ip, "port": 80}}, 400, f"Invalid IP address: {shown}")
            for ip, shown in BAD_IPS
        ],
        *[
            ({"json": {"ip": "10.0.0.1", "port": port}}, 400, f"Invalid port: {shown}")
            for port, shown in BAD_PORTS
        ],
        *[
            ({"json": {"ip": "10.0.0.1", "port": port}}, 400, "port: must be an integer")
            for port in WRONG_TYPE_PORTS
        ],
        *[
            (
                {"json": {"ip": "10.0.0.1", "port": 80, "protocol": p}},
                400,
                f"Invalid protocol: {shown}",
            )
            for p, shown in BAD_PROTOCOLS
        ],
        *BAD_BODIES,
    ]
    for kwargs, status, message in cases:
        response = await client.post("/network/ports", **kwargs)
        assert_error(response, status, message)
    assert await pool(client) == []


async def test_add_port_ignores_unknown_fields(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/network/ports", json={"ip": "10.0.0.1", "port": 80, "id": "x", "in_use": True}
    )
    assert response.status_code == 200
    assert (await pool(client))[0]["in_use"] is False


async def test_add_port_reports_the_first_bad_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/network/ports", json={"ip": "nope", "port": 0, "protocol": "icmp"}
    )
    assert_error(response, 400, "Invalid IP address: nope")
    response = await client.post(
        "/network/ports", json={"ip": "::1", "port": 0, "protocol": "icmp"}
    )
    assert_error(response, 400, "Invalid port: 0")


async def test_add_port_refuses_a_duplicate(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80, "tcp")
    await add(client, "::1", 80, "both")
    for ip, protocol in [
        ("10.0.0.1", "tcp"),
        ("10.0.0.1", "udp"),
        ("::ffff:10.0.0.1", "tcp"),
        ("0:0::1", "tcp"),
        ("::1", "both"),
    ]:
        response = await client.post(
            "/network/ports", json={"ip": ip, "port": 80, "protocol": protocol}
        )
        assert_error(response, 409, "Port already exists in pool")
    assert await pool(client) == [
        {"ip": "10.0.0.1", "port": 80, "protocol": "tcp", "in_use": False, "container": None},
        {"ip": "::1", "port": 80, "protocol": "both", "in_use": False, "container": None},
    ]


async def test_same_port_on_another_address_is_another_entry(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    await add(client, "10.0.0.2", 80)
    await add(client, "0.0.0.0", 80)
    assert len(await pool(client)) == 3


# --- GET /network/ports -------------------------------------------------------------


async def test_list_is_sorted_by_address_then_port(client: httpx.AsyncClient) -> None:
    for ip, port in [
        ("2001:db8::1", 1),
        ("10.0.0.2", 5),
        ("9.0.0.1", 7000),
        ("10.0.0.2", 40),
        ("::1", 3),
        ("10.0.0.10", 1),
        ("0.0.0.0", 22),
        ("10.0.0.2", 3),
    ]:
        await add(client, ip, port)
    assert keys(await pool(client)) == [
        ("0.0.0.0", 22),
        ("9.0.0.1", 7000),
        ("10.0.0.2", 3),
        ("10.0.0.2", 5),
        ("10.0.0.2", 40),
        ("10.0.0.10", 1),
        ("::1", 3),
        ("2001:db8::1", 1),
    ]


async def test_list_filters_by_in_use(running: RunningAgent, client: httpx.AsyncClient) -> None:
    for port in (1, 2, 3, 4):
        await add(client, "10.0.0.1", port)
    await client.put("/network/ports/10.0.0.1/2/use", json={"in_use": True})
    await running.agent.stash[PORT_POOL].reserve("srv-1", [PortRequest("10.0.0.1", 4)])
    assert keys(await pool(client, "?in_use=true")) == [("10.0.0.1", 2), ("10.0.0.1", 4)]
    assert keys(await pool(client, "?in_use=false")) == [("10.0.0.1", 1), ("10.0.0.1", 3)]
    assert keys(await pool(client, "?in_use=TRUE")) == [("10.0.0.1", 2), ("10.0.0.1", 4)]
    assert keys(await pool(client, "?in_use=0")) == [("10.0.0.1", 1), ("10.0.0.1", 3)]
    assert [p["container"] for p in await pool(client)] == [None, None, None, "srv-1"]
    assert [p["in_use"] for p in await pool(client)] == [False, True, False, True]


async def test_list_rejects_a_bad_in_use_filter(client: httpx.AsyncClient) -> None:
    for value in ["yes", "", "2"]:
        response = await client.get("/network/ports", params={"in_use": value})
        assert_error(response, 400, f"in_use: must be true or false, not {value}")


async def test_empty_pool_lists_nothing(client: httpx.AsyncClient) -> None:
    response = await client.get("/network/ports")
    assert response.json() == {"ports": []}


# --- GET /network/ports/:ip/:port ---------------------------------------------------


async def test_get_port_shows_its_container(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    await add(client, "10.0.0.1", 25565, "both")
    response = await client.get("/network/ports/10.0.0.1/25565")
    assert response.status_code == 200
    assert response.json() == {
        "ip": "10.0.0.1",
        "port": 25565,
        "protocol": "both",
        "in_use": False,
        "container": None,
    }
    await running.agent.stash[PORT_POOL].reserve("srv-7", [PortRequest("10.0.0.1", 25565)])
    response = await client.get("/network/ports/10.0.0.1/25565")
    assert response.json()["in_use"] is True
    assert response.json()["container"] == "srv-7"


async def test_ipv6_addresses_work_in_the_path(client: httpx.AsyncClient) -> None:
    for path_ip in ["::1", "0:0::1", "[::1]", "%3A%3A1", "::ffff:127.0.0.1"]:
        stored = "127.0.0.1" if "ffff" in path_ip else "::1"
        await add(client, stored, 25565)
        response = await client.get(f"/network/ports/{path_ip}/25565")
        assert response.status_code == 200, response.text
        assert response.json()["ip"] == stored
        response = await client.put(f"/network/ports/{path_ip}/25565/use", json={"in_use": True})
        assert response.status_code == 200, response.text
        assert response.json()["ip"] == stored
        response = await client.delete(f"/network/ports/{path_ip}/25565")
        assert response.status_code == 200, response.text
        assert await pool(client) == []


async def test_get_unknown_port_is_404(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    for path in ("/network/ports/10.0.0.1/81", "/network/ports/10.0.0.2/80"):
        assert_error(await client.get(path), 404, "Port not found in pool")


async def test_path_values_are_validated(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    for ip, port, message in [
        ("nope", "80", "Invalid IP address: nope"),
        ("10.0.0.300", "80", "Invalid IP address: 10.0.0.300"),
        ("10.0.0.1", "abc", "Invalid port: abc"),
        ("10.0.0.1", "0", "Invalid port: 0"),
        ("10.0.0.1", "65536", "Invalid port: 65536"),
        ("10.0.0.1", "-5", "Invalid port: -5"),
        ("10.0.0.1", "８０", "Invalid port: ８０"),
    ]:
        assert_error(await client.get(f"/network/ports/{ip}/{port}"), 400, message)
        response = await client.put(f"/network/ports/{ip}/{port}/use", json={"in_use": True})
        assert_error(response, 400, message)
        assert_error(await client.delete(f"/network/ports/{ip}/{port}"), 400, message)
    assert len(await pool(client)) == 1


# --- GET /network/ports/random ------------------------------------------------------


async def test_random_port_with_an_empty_pool_is_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/network/ports/random"), 404, "No available ports in pool")


async def test_random_port_is_free_and_not_reserved(client: httpx.AsyncClient) -> None:
    for port in range(1, 6):
        await add(client, "10.0.0.1", port)
    for port in (1, 2, 4, 5):
        await client.put(f"/network/ports/10.0.0.1/{port}/use", json={"in_use": True})
    for _ in range(5):
        response = await client.get("/network/ports/random")
        assert response.status_code == 200
        assert response.json() == {"ip": "10.0.0.1", "port": 3, "protocol": "tcp", "in_use": False}
    assert keys(await pool(client, "?in_use=false")) == [("10.0.0.1", 3)]
    await client.put("/network/ports/10.0.0.1/3/use", json={"in_use": True})
    assert_error(await client.get("/network/ports/random"), 404, "No available ports in pool")


async def test_random_port_is_chosen_among_all_free_ones(client: httpx.AsyncClient) -> None:
    for port in range(1, 5):
        await add(client, "10.0.0.1", port)
    seen = {(await client.get("/network/ports/random")).json()["port"] for _ in range(60)}
    assert seen == {1, 2, 3, 4}


async def test_random_port_protocol_filter(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 1, "tcp")
    response = await client.get("/network/ports/random", params={"protocol": "udp"})
    assert_error(response, 404, "No available ports in pool")
    await add(client, "10.0.0.1", 2, "both")
    response = await client.get("/network/ports/random", params={"protocol": "udp"})
    assert response.json()["port"] == 2
    response = await client.get("/network/ports/random", params={"protocol": "icmp"})
    assert_error(response, 400, "Invalid protocol: icmp")


# --- PUT /network/ports/:ip/:port/use -----------------------------------------------


async def test_use_marks_and_frees_a_port(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    response = await client.put("/network/ports/10.0.0.1/80/use", json={"in_use": True})
    assert response.status_code == 200
    assert response.json() == {
        "message": "Port usage updated",
        "ip": "10.0.0.1",
        "port": 80,
        "in_use": True,
    }
    assert (await pool(client))[0]["in_use"] is True
    response = await client.put("/network/ports/10.0.0.1/80/use", json={"in_use": False})
    assert response.json()["in_use"] is False
    assert (await pool(client))[0]["in_use"] is False


async def test_use_of_an_unknown_port_is_404(client: httpx.AsyncClient) -> None:
    response = await client.put("/network/ports/10.0.0.1/80/use", json={"in_use": True})
    assert_error(response, 404, "Port not found in pool")


async def test_use_validates_its_body(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    cases: list[tuple[object, str]] = [
        ({}, "in_use: is required"),
        ({"in_use": "yes"}, "in_use: must be true or false"),
        ({"in_use": 1}, "in_use: must be true or false"),
        ({"in_use": None}, "in_use: must be true or false"),
        ([], "Body must be a JSON object"),
    ]
    for body, message in cases:
        response = await client.put("/network/ports/10.0.0.1/80/use", json=body)
        assert_error(response, 400, message)
    assert (await pool(client))[0]["in_use"] is False


async def test_a_container_port_cannot_be_freed_by_hand(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    await add(client, "10.0.0.1", 80)
    await running.agent.stash[PORT_POOL].reserve("srv-1", [PortRequest("10.0.0.1", 80)])
    response = await client.put("/network/ports/10.0.0.1/80/use", json={"in_use": False})
    assert_error(response, 409, "Port is bound to container srv-1")
    response = await client.put("/network/ports/10.0.0.1/80/use", json={"in_use": True})
    assert response.status_code == 200
    assert response.json()["in_use"] is True
    assert (await client.get("/network/ports/10.0.0.1/80")).json()["container"] == "srv-1"


# --- DELETE /network/ports/:ip/:port ------------------------------------------------


async def test_delete_port(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    await add(client, "10.0.0.1", 81)
    response = await client.delete("/network/ports/10.0.0.1/80")
    assert response.status_code == 200
    assert response.json() == {"message": "Port deleted from pool"}
    assert keys(await pool(client)) == [("10.0.0.1", 81)]
    assert_error(await client.delete("/network/ports/10.0.0.1/80"), 404, "Port not found in pool")


async def test_a_port_marked_in_use_by_hand_can_be_deleted(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 80)
    await client.put("/network/ports/10.0.0.1/80/use", json={"in_use": True})
    assert (await client.delete("/network/ports/10.0.0.1/80")).status_code == 200


async def test_a_container_port_cannot_be_deleted(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    await add(client, "::1", 80)
    await running.agent.stash[PORT_POOL].reserve("srv-2", [PortRequest("::1", 80)])
    assert_error(
        await client.delete("/network/ports/::1/80"), 409, "Port is bound to container srv-2"
    )
    assert keys(await pool(client)) == [("::1", 80)]
    await running.agent.stash[PORT_POOL].release("srv-2")
    assert (await client.delete("/network/ports/::1/80")).status_code == 200


# --- POST /network/ports/bulk-delete ------------------------------------------------


async def test_bulk_delete(running: RunningAgent, client: httpx.AsyncClient) -> None:
    for port in range(1, 6):
        await add(client, "10.0.0.1", port)
    await running.agent.stash[PORT_POOL].reserve("srv-3", [PortRequest("10.0.0.1", 4)])
    response = await client.post(
        "/network/ports/bulk-delete",
        json={
            "ports": [
                {"ip": "10.0.0.1", "port": 1},
                {"ip": "10.0.0.1", "port": 2},
                {"ip": "10.0.0.1", "port": 2},
                {"ip": "10.0.0.1", "port": 4},
                {"ip": "10.0.0.1", "port": 99},
                {"ip": "10.0.0.7", "port": 1},
            ]
        },
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "Deleted 2 ports from pool",
        "deleted_count": 2,
        "skipped": [{"ip": "10.0.0.1", "port": 4, "container": "srv-3"}],
    }
    assert keys(await pool(client)) == [("10.0.0.1", 3), ("10.0.0.1", 4), ("10.0.0.1", 5)]


async def test_bulk_delete_of_nothing(client: httpx.AsyncClient) -> None:
    response = await client.post("/network/ports/bulk-delete", json={"ports": []})
    assert response.json() == {
        "message": "Deleted 0 ports from pool",
        "deleted_count": 0,
        "skipped": [],
    }


async def test_bulk_delete_validates_everything_first(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 1)
    cases: list[tuple[object, str]] = [
        ({}, "ports: is required"),
        ({"ports": "10.0.0.1:1"}, "ports: must be a list"),
        ({"ports": [{"ip": "10.0.0.1", "port": 1}, "x"]}, "ports[1]: must be an object"),
        ({"ports": [{"ip": "10.0.0.1"}]}, "ports[0].port: is required"),
        (
            {"ports": [{"ip": "10.0.0.1", "port": 1}, {"ip": "x", "port": 2}]},
            "Invalid IP address: x",
        ),
        ({"ports": [{"ip": "10.0.0.1", "port": 1}, {"ip": "::1", "port": 0}]}, "Invalid port: 0"),
        ({"ports": [{"ip": "10.0.0.1", "port": "1"}]}, "ports[0].port: must be an integer"),
    ]
    for body, message in cases:
        response = await client.post("/network/ports/bulk-delete", json=body)
        assert_error(response, 400, message)
    assert keys(await pool(client)) == [("10.0.0.1", 1)]


# --- POST /network/ports/bulk -------------------------------------------------------


async def test_bulk_add_a_list(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 2, "udp")
    response = await client.post(
        "/network/ports/bulk",
        json={
            "ports": [
                {"ip": "10.0.0.1", "port": 1},
                {"ip": "10.0.0.1", "port": 2},
                {"ip": "2001:DB8::1", "port": 3, "protocol": "both"},
                {"ip": "10.0.0.1", "port": 1, "protocol": "udp"},
            ]
        },
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "Added 2 ports to pool",
        "added_count": 2,
        "skipped_count": 1,
    }
    assert [(p["ip"], p["port"], p["protocol"]) for p in await pool(client)] == [
        ("10.0.0.1", 1, "tcp"),
        ("10.0.0.1", 2, "udp"),
        ("2001:db8::1", 3, "both"),
    ]


async def test_bulk_add_list_takes_a_default_protocol(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/network/ports/bulk",
        json={
            "protocol": "udp",
            "ports": [
                {"ip": "10.0.0.1", "port": 1},
                {"ip": "10.0.0.1", "port": 2, "protocol": "tcp"},
            ],
        },
    )
    assert response.json()["added_count"] == 2
    assert [p["protocol"] for p in await pool(client)] == ["udp", "tcp"]


async def test_bulk_add_a_range(client: httpx.AsyncClient) -> None:
    await add(client, "::1", 27020)
    response = await client.post(
        "/network/ports/bulk",
        json={"ip": "0:0::1", "start": 27015, "end": 27030, "protocol": "both"},
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "Added 15 ports to pool",
        "added_count": 15,
        "skipped_count": 1,
    }
    ports = await pool(client)
    assert keys(ports) == [("::1", port) for port in range(27015, 27031)]
    assert {p["protocol"] for p in ports if p["port"] != 27020} == {"both"}


async def test_bulk_add_the_whole_range(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/network/ports/bulk", json={"ip": "10.0.0.1", "start": 1, "end": MAX}
    )
    assert response.json()["added_count"] == MAX
    assert len(await pool(client)) == MAX
    response = await client.post(
        "/network/ports/bulk", json={"ip": "10.0.0.1", "start": 100, "end": 100}
    )
    assert response.json() == {
        "message": "Added 0 ports to pool",
        "added_count": 0,
        "skipped_count": 1,
    }


async def test_bulk_add_validates_everything_first(client: httpx.AsyncClient) -> None:
    await add(client, "10.0.0.1", 1)
    cases: list[tuple[object, str]] = [
        ({}, "ports: is required (or a range: ip, start, end)"),
        ({"ports": {"ip": "10.0.0.1"}}, "ports: must be a list"),
        ({"ports": [{"port": 1}]}, "ports[0].ip: is required"),
        (
            {"ports": [{"ip": "10.0.0.2", "port": 1}, {"ip": "10.0.0.300", "port": 1}]},
            "Invalid IP address: 10.0.0.300",
        ),
        (
            {"ports": [{"ip": "10.0.0.2", "port": 1}, {"ip": "10.0.0.2", "port": 65536}]},
            "Invalid port: 65536",
        ),
        ({"ports": [{"ip": "10.0.0.2", "port": 1, "protocol": "sctp"}]}, "Invalid protocol: sctp"),
        ({"protocol": "x", "ports": [{"ip": "10.0.0.2", "port": 1}]}, "Invalid protocol: x"),
        ({"ip": "10.0.0.2", "start": 1}, "end: is required"),
        ({"ip": "10.0.0.2", "end": 1}, "start: is required"),
        ({"ip": "nope", "start": 1, "end": 2}, "Invalid IP address: nope"),
        ({"ip": "10.0.0.2", "start": 0, "end": 2}, "Invalid port: 0"),
        ({"ip": "10.0.0.2", "start": 1, "end": 70000}, "Invalid port: 70000"),
        ({"ip": "10.0.0.2", "start": "1", "end": 2}, "start: must be an integer"),
        ({"ports": [{"ip": "10.0.0.2", "port": [1]}]}, "ports[0].port: must be an integer"),
        ({"ip": "10.0.0.2", "start": 9, "end": 2}, "Invalid port range: 9-2"),
        ({"ip": "10.0.0.2", "start": 1, "end": 2, "protocol": "TCP"}, "Invalid protocol: TCP"),
    ]
    for body, message in cases:
        response = await client.post("/network/ports/bulk", json=body)
        assert_error(response, 400, message)
    assert keys(await pool(client)) == [("10.0.0.1", 1)]


# --- access, persistence ------------------------------------------------------------


async def test_every_route_needs_the_token(running: RunningAgent) -> None:
    async with api_client(running.url, token=None) as anonymous:
        for method, path in [
            ("GET", "/network/ports"),
            ("POST", "/network/ports"),
            ("GET", "/network/ports/random"),
            ("GET", "/network/ports/::1/80"),
            ("PUT", "/network/ports/::1/80/use"),
            ("DELETE", "/network/ports/::1/80"),
            ("POST", "/network/ports/bulk"),
            ("POST", "/network/ports/bulk-delete"),
        ]:
            response = await anonymous.request(method, path, json={"ip": "::1", "port": 80})
            assert_error(response, 401, "Missing or invalid authorization token")
    async with api_client(running.url) as c:
        assert await pool(c) == []


async def test_the_pool_survives_a_restart(
    start_agent: StartAgent, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    # No Docker engine for these agents: once it sees the engine, the containers core frees
    # the ports of owners that are not its containers, and "srv-1" is not a real one.
    no_docker = {"docker": {"socket_path": str(tmp_path / "no-docker.sock")}}
    config_path = make_config(no_docker)
    first = await start_agent(config_path, environ={})
    async with api_client(first.url) as c:
        await c.post("/network/ports/bulk", json={"ip": "10.0.0.1", "start": 1, "end": 5})
        await add(c, "2001:db8::1", 25565, "both")
        await c.put("/network/ports/10.0.0.1/2/use", json={"in_use": True})
        await c.delete("/network/ports/10.0.0.1/5")
        await first.agent.stash[PORT_POOL].reserve(
            "srv-1", [PortRequest("2001:db8::1", 25565, "udp"), PortRequest("10.0.0.1", 3)]
        )
        before = await pool(c)
    await first.stop()

    second = await start_agent(config_path, environ={})
    async with api_client(second.url) as c:
        assert await pool(c) == before
        assert len(before) == 5
        held = await second.agent.stash[PORT_POOL].held()
        assert {owner: [(p.ip, p.port) for p in ports] for owner, ports in held.items()} == {
            "srv-1": [("10.0.0.1", 3), ("2001:db8::1", 25565)]
        }
        assert_error(
            await c.delete("/network/ports/10.0.0.1/3"), 409, "Port is bound to container srv-1"
        )
    await second.stop()


async def test_the_network_section_has_defaults(client: httpx.AsyncClient) -> None:
    response = await client.get("/remote/config")
    assert response.json()["network"] == {
        "manage_firewall": False,
        # deprecated, ignored (the firewall plugin's section says how iptables runs)
        "iptables": None,
        "ip6tables": None,
        "firewall_chain": None,
        "firewall_parent": None,
        "firewall_timeout": None,
    }


def test_master_token_constant_is_the_one_the_client_sends() -> None:
    assert MASTER.startswith("lightd_")
