"""The word list default run names are made of: ``Board()`` without ``name=`` is called, say, "Brave Falcon".

Two words, an adjective and a noun, as KohakuBoard's "Predicate Object" names:
readable in ``kobo list`` and the viewer, easy to say and to tell apart.  The
lists are plain ASCII, one capitalised word each, with no word in both lists
and none that reads badly next to another.  128 x 128 = 16,384 names; the run
id, not the name, tells runs apart.
"""

from __future__ import annotations

ADJECTIVES = (
    "Agile", "Amber", "Ancient", "Arctic", "Azure", "Bold", "Brave", "Breezy", "Bright", "Brisk",
    "Calm", "Candid", "Clever", "Cobalt", "Cosmic", "Crimson", "Crisp", "Curious", "Daring", "Dapper",
    "Dawning", "Deep", "Distant", "Dusky", "Eager", "Early", "Electric", "Elegant", "Emerald", "Epic",
    "Fabled", "Fair", "Fearless", "Fleet", "Floral", "Fluent", "Frosty", "Gallant", "Gentle", "Gilded",
    "Glad", "Golden", "Graceful", "Grand", "Hardy", "Hidden", "Honest", "Humble", "Icy", "Indigo",
    "Ivory", "Jade", "Jolly", "Jovial", "Keen", "Kind", "Lively", "Loyal", "Lucid", "Lucky",
    "Lunar", "Magnetic", "Mellow", "Merry", "Mighty", "Misty", "Modest", "Nimble", "Noble", "Northern",
    "Oaken", "Ochre", "Patient", "Peaceful", "Polar", "Polished", "Proud", "Quick", "Quiet", "Radiant",
    "Rapid", "Restless", "Robust", "Rosy", "Royal", "Ruby", "Rustic", "Sandy", "Sapphire", "Scarlet",
    "Serene", "Sharp", "Shining", "Silent", "Silver", "Sleek", "Smooth", "Snowy", "Solar", "Sonic",
    "Spry", "Stable", "Starry", "Steady", "Stellar", "Stoic", "Sturdy", "Sunny", "Swift", "Tidal",
    "Tranquil", "True", "Twilight", "Upbeat", "Valiant", "Velvet", "Verdant", "Vivid", "Wandering", "Warm",
    "Wild", "Windy", "Wise", "Witty", "Woven", "Young", "Zealous", "Zesty",
)

NOUNS = (
    "Acorn", "Albatross", "Anchor", "Antelope", "Aurora", "Badger", "Beacon", "Bison", "Bluff", "Brook",
    "Canyon", "Cedar", "Cheetah", "Cipher", "Cliff", "Comet", "Compass", "Condor", "Coral", "Cougar",
    "Crane", "Creek", "Crystal", "Cypress", "Delta", "Dolphin", "Dune", "Eagle", "Echo", "Ember",
    "Falcon", "Fern", "Finch", "Fjord", "Flame", "Forest", "Fox", "Galaxy", "Garden", "Gazelle",
    "Geyser", "Glacier", "Grove", "Harbor", "Hawk", "Heron", "Horizon", "Ibis", "Island", "Jaguar",
    "Jasper", "Kestrel", "Lagoon", "Lantern", "Lark", "Lighthouse", "Lily", "Lynx", "Maple", "Meadow",
    "Meteor", "Mesa", "Mountain", "Nebula", "Nova", "Oak", "Oasis", "Ocean", "Orbit", "Orchid",
    "Osprey", "Otter", "Owl", "Panther", "Pebble", "Pelican", "Phoenix", "Pine", "Planet", "Prairie",
    "Puffin", "Quartz", "Quasar", "Rapids", "Raven", "Reef", "Ridge", "River", "Robin", "Sail",
    "Salmon", "Sequoia", "Shore", "Sparrow", "Spruce", "Star", "Stone", "Summit", "Swallow", "Swan",
    "Thistle", "Thunder", "Tiger", "Trail", "Tundra", "Valley", "Voyage", "Walrus", "Wave", "Willow",
    "Wolf", "Wren", "Yak", "Zephyr", "Badland", "Bay", "Birch", "Boulder", "Breeze", "Butte",
    "Cascade", "Cove", "Dawn", "Harvest", "Marsh", "Prism", "Sprout", "Tern",
)


def friendly_name(rng: object | None = None) -> str:
    """A random "Adjective Noun" name, e.g. "Brave Falcon" (``rng``: a ``random.Random`` for tests)."""
    if rng is None:
        import secrets

        return f"{secrets.choice(ADJECTIVES)} {secrets.choice(NOUNS)}"
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"  # type: ignore[attr-defined]
