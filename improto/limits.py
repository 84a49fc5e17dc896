"""Numeric limits of protocol v1 and of the post-v1 frames (spec sections 18, 19 and 20).
spec/PROTOCOL.md is normative; these mirror it."""

PROTOCOL_VERSION = 1

LENGTH_PREFIX_SIZE = 4
HEADER_SIZE = 7
# The length prefix counts header + body. Receivers refuse anything larger before buffering it.
MAX_FRAME_LENGTH = 131_072

MAX_DEVICE_ID = 64
MAX_TOKEN = 4096
MAX_BODY = 65_535
MAX_GROUP_NAME = 128
MAX_TEXT = 1024  # ERROR and CLOSE texts
MAX_IDS_PER_REQUEST = 1000  # GROUP_CREATE / GROUP_ADD / GROUP_REMOVE member lists
MAX_GROUP_MEMBERS = 10_000
MAX_GROUPS_PER_USER = 500
# The largest HELLO: header, protocol_version, client_kind, device_id str8[1..64] and token
# str16[1..4096]. Until HELLO_OK the server refuses a longer length prefix (spec 8.1, 16).
MAX_HELLO_FRAME = HEADER_SIZE + 1 + 1 + (1 + MAX_DEVICE_ID) + (2 + MAX_TOKEN)

OFFLINE_PAGE_DEFAULT = 200
OFFLINE_PAGE_MAX = 200
HISTORY_PAGE_DEFAULT = 20
HISTORY_PAGE_MAX = 100

# Post-v1 (spec section 18).
MAX_FEATURES = 32  # FEATURES / FEATURES_OK list entries
CONV_PAGE_DEFAULT = 50
CONV_PAGE_MAX = 100
NOTICE_MAX_IDS = 200  # INBOX_NOTICE msg_ids
# Post-v1 (spec section 19): PUSH_REGISTER.
MAX_PLATFORM = 32  # bytes of a platform name ([a-z0-9._-])
MAX_PUSH_TOKEN = 4096  # UTF-8 bytes of a push token
# Post-v1 (spec section 20): TIMELINE_PULL / TIMELINE_PAGE pages as OFFLINE_PULL does, and
# TIMELINE_HEADS_PAGE has at most one head per group of the user.
TIMELINE_PAGE_DEFAULT = 200
TIMELINE_PAGE_MAX = 200
MAX_TIMELINE_HEADS = MAX_GROUPS_PER_USER
# TIMELINE_PULL `held`: the msg_ids the client already holds, omitted from the page (but
# covered by its position); at most this many per request.
TIMELINE_HELD_MAX = 1000

U64_MAX = 2**64 - 1
# OFFLINE_PULL cursor value meaning "start after the position the server stored for this device".
CURSOR_RESUME = U64_MAX
