"""How much of the archive the report keeps: every cap in one place.

The archive can be hundreds of MB with single messages of a MiB or more, so nothing holds it
whole: each item is counted at once and then kept in a small, capped form (a message's headers
and excerpt, a table row of cut cells). Memory stays bounded, the counts and the chart still
cover everything, and the page says where it stops, pointing to data.json.
"""

MESSAGE_CAP = 2_000  # messages shown in detail
ROW_CAP = 5_000  # rows per table
GROUP_CAP = 50  # tables of other records; beyond, one table of "other shapes"
COLUMN_CAP = 40  # columns per table; the last one holds any further fields
CELL_CHARS = 500  # a cell longer than this is cut, with an ellipsis
EXCERPT_CHARS = 400  # text shown per message
TEXT_BUDGET = 16 * 1024 * 1024  # characters kept for all tables together
MIME_PREFIX = 64 * 1024  # a message is read this far: headers and text come before attachments
BODY_PREFIX = 32 * 1024  # of one text part, enough for an excerpt behind an HTML <head>
MAX_TOKEN = 64 * 1024 * 1024  # one JSON value may not be longer (yajl holds it whole)
ITEM_DEPTH = 32  # nesting kept inside one item
ITEM_ENTRIES = 1_000  # members or elements kept per object or array inside one item
ITEM_CHARS = 4 * 1024 * 1024  # characters kept per item
HEADER_CHARS = 2_000  # of one header, decoded and shown
EVENT_KIND_CAP = 100  # event types counted apart; any further ones are counted together
GROUP_DEPTH = 16  # arrays inside `data` descended into before an array is an item itself
