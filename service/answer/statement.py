"""The article-15 statement: what GDPR art. 15(1)(a)-(h) obliges the controller to tell the
data subject beside the copy of the data (SPEC "The article-15 statement"), per language.

The texts come from `CONTROLLER_STATEMENT` (a TOML file, read with `tomllib`) or, unset, from
the built-in defaults below, written for e-mail marketing. A file must hold every entry: a
missing, empty, unknown or malformed one stops start-up with one line naming it
(`CONTROLLER_STATEMENT: missing [nl].rights`). The statement is loaded once, at start-up
(`service.app.create_app`), into frozen types; the report shows it after what was found.

The defaults' `[contact]` entries are placeholders a company must replace: they say so in the
text (`[contact] ... not filled in`), and `load_statement` logs a warning while they are used.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from service.config import ConfigError

log = structlog.get_logger(__name__)

SETTING = "CONTROLLER_STATEMENT"
LANGUAGES = ("en", "nl")
# The texts of one language, in the order art. 15(1) lists them ((a)-(h)).
TEXTS = (
    "purposes",  # (a)
    "categories",  # (b)
    "recipients",  # (c), Copernica as processor
    "storage",  # (d)
    "rights",  # (e) arts. 16-18, 21
    "complaint",  # (f) art. 77; the authority's name and address follow it
    "source",  # (g)
    "automated",  # (h)
)
CONTACT_REQUIRED = ("name", "email")
CONTACT_OPTIONAL = ("address",)
AUTHORITY = ("name", "url")
PLACEHOLDER = "not filled in"  # in the default contact's values: a company must set them


@dataclass(frozen=True, slots=True)
class Texts:
    """One language's texts; each may hold paragraphs separated by blank lines."""

    purposes: str
    categories: str
    recipients: str
    storage: str
    rights: str
    complaint: str
    source: str
    automated: str


@dataclass(frozen=True, slots=True)
class Contact:
    """Who answers the subject's questions about their data (the privacy contact)."""

    name: str
    email: str
    address: str = ""  # postal, optional

    @property
    def placeholder(self) -> bool:
        return PLACEHOLDER in self.name or PLACEHOLDER in self.email


@dataclass(frozen=True, slots=True)
class Authority:
    """The supervisory authority a complaint goes to (art. 77)."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class Statement:
    contact: Contact
    authority: Authority
    en: Texts
    nl: Texts

    def texts(self, language: str) -> Texts:
        """The texts in `language` (`en` or `nl`); English for any other."""
        return self.nl if language == "nl" else self.en


# -- the built-in defaults: e-mail marketing, the Dutch authority ------------------------------

_DEFAULTS: dict[str, Any] = {
    "contact": {
        "name": f"[contact] name {PLACEHOLDER}",
        "email": f"[contact] email {PLACEHOLDER}",
    },
    "authority": {
        "name": "Autoriteit Persoonsgegevens",
        "url": "https://autoriteitpersoonsgegevens.nl",
    },
    "en": {
        "purposes": (
            "We use your e-mail address and the details stored with it to send you the e-mail "
            "you signed up for, such as newsletters, offers and service messages. We also look "
            "at which messages are delivered, opened and clicked, so that we send you fewer "
            "messages that do not interest you, and we remember when you unsubscribe."
        ),
        "categories": (
            "Your e-mail address; the details stored with it in our mailing lists, such as "
            "your name, your preferences and your interests (shown under \u201cYour "
            "details\u201d); the messages we sent you; and what happened to them: deliveries, "
            "opens and clicks, with their time and, for opens and clicks, the IP address and "
            "e-mail program used."
        ),
        "recipients": (
            "Copernica B.V. in the Netherlands sends our e-mail and stores these data for us, "
            "as our processor: it may use them only on our instructions and for us. We do not "
            "sell your data, and we do not give it to others for their own use."
        ),
        "storage": (
            "We keep your details for as long as you are on our mailing lists. When you "
            "unsubscribe or ask us to delete your data, we delete it, unless a law obliges us "
            "to keep something (for example an invoice). Records of what happened to our "
            "messages are kept for as long as we need them to run our mailings, and no longer."
        ),
        "rights": (
            "You may ask us to correct data that is wrong or incomplete (article 16 of the "
            "GDPR), to delete your data (article 17), and to limit what we do with it while a "
            "question about it is being settled (article 18). You may also object to our use "
            "of your data (article 21); if you object to marketing e-mail, we stop sending it. "
            "Every message we send has a link to unsubscribe. To use any of these rights, write "
            "to the contact named below."
        ),
        "complaint": (
            "If you think we handle your data wrongly, you may complain to the data protection "
            "authority (article 77 of the GDPR). We would like to hear from you first, so that "
            "we can try to put it right."
        ),
        "source": (
            "You gave us your e-mail address and details yourself, for example when you signed "
            "up or placed an order. What happened to our messages (deliveries, opens, clicks) "
            "was recorded by the e-mail system when the messages reached you and you read them."
        ),
        "automated": (
            "We make no decisions about you by computer alone that have legal effects for you "
            "or affect you in a similar way (article 22 of the GDPR). We may choose which "
            "messages to send you from your interests; that has no such effect."
        ),
    },
    "nl": {
        "purposes": (
            "Wij gebruiken uw e-mailadres en de gegevens die daarbij horen om u de e-mail te "
            "sturen waarvoor u zich hebt aangemeld, zoals nieuwsbrieven, aanbiedingen en "
            "servicemails. Ook kijken wij welke berichten worden afgeleverd, geopend en "
            "aangeklikt, zodat wij u minder berichten sturen die u niet interesseren, en wij "
            "onthouden wanneer u zich afmeldt."
        ),
        "categories": (
            "Uw e-mailadres; de gegevens die daarbij in onze verzendlijsten staan, zoals uw "
            "naam, uw voorkeuren en uw interesses (te zien onder \u201cYour details\u201d); de "
            "berichten die wij u stuurden; en wat daarmee gebeurde: afleveringen, openingen en "
            "kliks, met het tijdstip en, bij openingen en kliks, het IP-adres en het "
            "e-mailprogramma."
        ),
        "recipients": (
            "Copernica B.V. in Nederland verstuurt onze e-mail en bewaart deze gegevens voor "
            "ons, als onze verwerker: Copernica mag ze alleen in onze opdracht en voor ons "
            "gebruiken. Wij verkopen uw gegevens niet en geven ze niet aan anderen voor eigen "
            "gebruik."
        ),
        "storage": (
            "Wij bewaren uw gegevens zolang u op onze verzendlijsten staat. Als u zich afmeldt "
            "of ons vraagt uw gegevens te wissen, wissen wij ze, tenzij een wet ons verplicht "
            "iets te bewaren (bijvoorbeeld een factuur). Gegevens over wat er met onze "
            "berichten gebeurde, bewaren wij zolang wij ze nodig hebben voor onze mailings, en "
            "niet langer."
        ),
        "rights": (
            "U mag ons vragen gegevens die onjuist of onvolledig zijn te verbeteren (artikel 16 "
            "van de AVG), uw gegevens te wissen (artikel 17) en het gebruik ervan te beperken "
            "zolang er een vraag over loopt (artikel 18). Ook mag u bezwaar maken tegen ons "
            "gebruik van uw gegevens (artikel 21); maakt u bezwaar tegen marketingmail, dan "
            "stoppen wij daarmee. Elk bericht van ons heeft een link om u af te melden. Wilt u "
            "een van deze rechten gebruiken, schrijf dan naar het contact hieronder."
        ),
        "complaint": (
            "Vindt u dat wij niet goed met uw gegevens omgaan, dan mag u een klacht indienen "
            "bij de toezichthouder (artikel 77 van de AVG). Wij horen het graag eerst van u, "
            "zodat wij kunnen proberen het op te lossen."
        ),
        "source": (
            "U gaf ons uw e-mailadres en gegevens zelf, bijvoorbeeld toen u zich aanmeldde of "
            "iets bestelde. Wat er met onze berichten gebeurde (afleveringen, openingen, kliks) "
            "legde het e-mailsysteem vast toen de berichten u bereikten en u ze las."
        ),
        "automated": (
            "Wij nemen geen besluiten over u die alleen door een computer worden genomen en "
            "die rechtsgevolgen voor u hebben of u op een vergelijkbare manier raken (artikel "
            "22 van de AVG). Wij kunnen op basis van uw interesses kiezen welke berichten wij u "
            "sturen; dat heeft zulke gevolgen niet."
        ),
    },
}

# The headings the report gives each text, per language (the texts are the company's, the
# headings the service's).
HEADINGS = {
    "en": {
        "title": "What the law says we must tell you",
        "intro": "Besides a copy of your data, the GDPR (article 15) gives you the right to know "
        "the following.",
        "purposes": "What we use your data for",
        "categories": "What data we have",
        "recipients": "Who receives your data",
        "storage": "How long we keep it",
        "rights": "Your rights",
        "complaint": "Complaints",
        "authority": "The authority",
        "source": "Where your data comes from",
        "automated": "Decisions by computer",
        "contact": "Questions about your data",
    },
    "nl": {
        "title": "Wat wij u volgens de wet moeten vertellen",
        "intro": "Naast een kopie van uw gegevens geeft de AVG (artikel 15) u het recht het "
        "volgende te weten.",
        "purposes": "Waarvoor wij uw gegevens gebruiken",
        "categories": "Welke gegevens wij hebben",
        "recipients": "Wie uw gegevens ontvangen",
        "storage": "Hoe lang wij ze bewaren",
        "rights": "Uw rechten",
        "complaint": "Een klacht indienen",
        "authority": "De toezichthouder",
        "source": "Waar uw gegevens vandaan komen",
        "automated": "Besluiten door een computer",
        "contact": "Vragen over uw gegevens",
    },
}


# -- reading ----------------------------------------------------------------------------------


def load_statement(path: str | None) -> Statement:
    """The statement from the TOML file at `path`, or the built-in defaults when None.
    ConfigError (one line, naming the entry) for a file that cannot be read or is incomplete."""
    if path is None:
        statement = DEFAULT_STATEMENT
    else:
        try:
            with open(path, "rb") as file:
                raw = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"{SETTING}: cannot read {path!r} ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{SETTING}: not valid TOML ({exc})") from None
        statement = parse_statement(raw)
    if statement.contact.placeholder:
        log.warning(
            "controller_statement_placeholder",
            note=f"the report names no privacy contact: set [contact] in {SETTING}",
        )
    return statement


def parse_statement(raw: dict[str, Any]) -> Statement:
    """The statement from a parsed TOML document (every entry checked)."""
    _known(raw, "", ("contact", "authority", *LANGUAGES))
    contact = _table(raw, "contact")
    _known(contact, "[contact].", CONTACT_REQUIRED + CONTACT_OPTIONAL)
    authority = _table(raw, "authority")
    _known(authority, "[authority].", AUTHORITY)
    url = _text(authority, "authority", "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{SETTING}: [authority].url must be an http(s) address, got {url!r}")
    email = _text(contact, "contact", "email")
    if PLACEHOLDER not in email and ("@" not in email or any(c.isspace() for c in email)):
        raise ConfigError(f"{SETTING}: [contact].email must be an e-mail address, got {email!r}")
    texts = {}
    for language in LANGUAGES:
        table = _table(raw, language)
        _known(table, f"[{language}].", TEXTS)
        texts[language] = Texts(**{name: _text(table, language, name) for name in TEXTS})
    address = contact.get("address", "")
    if not isinstance(address, str):
        raise ConfigError(f"{SETTING}: [contact].address must be text")
    return Statement(
        contact=Contact(_text(contact, "contact", "name"), email, address.strip()),
        authority=Authority(_text(authority, "authority", "name"), url),
        en=texts["en"],
        nl=texts["nl"],
    )


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in raw:
        raise ConfigError(f"{SETTING}: missing [{name}]")
    table = raw[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{SETTING}: [{name}] must be a table")
    return table


def _text(table: dict[str, Any], where: str, name: str) -> str:
    if name not in table:
        raise ConfigError(f"{SETTING}: missing [{where}].{name}")
    value = table[name]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{SETTING}: [{where}].{name} must be text, not empty")
    return value.strip()


def _known(table: dict[str, Any], where: str, names: tuple[str, ...]) -> None:
    unknown = sorted(set(table) - set(names))
    if unknown:
        name = f"{where}{unknown[0]}" if where else f"[{unknown[0]}]"
        raise ConfigError(f"{SETTING}: unknown entry {name}")


DEFAULT_STATEMENT = parse_statement(_DEFAULTS)
