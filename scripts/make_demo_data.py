"""Generate the demo data shipped in securefpt/demo_data/ (run once; output is committed).

A small synthetic multilingual news-topic set: for each language, short headlines
composed from topic keywords and sentence templates written for that language. The
languages get deliberately unequal amounts of training data (English most, Yoruba
least) to mimic the high/low-resource split that federated prompt tuning targets.
Words overlap across topics on purpose (shared filler, ambiguous words) so the task is
learnable but not trivial. See docs/demo_data.md.

    python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

TOPICS = ["business", "health", "politics", "sports", "technology"]

VOCAB = {
    "eng": {
        "sports": ["football match", "league title", "striker", "coach", "stadium", "championship", "goalkeeper", "marathon", "tournament", "final whistle"],
        "politics": ["election", "parliament", "president", "minister", "opposition party", "senate vote", "campaign", "governor", "cabinet", "ballot"],
        "health": ["hospital", "vaccine", "malaria", "doctors", "clinic", "outbreak", "nurses", "patients", "health ministry", "medicine"],
        "business": ["stock market", "bank", "inflation", "investors", "trade deal", "company profits", "central bank", "exports", "currency", "market prices"],
        "technology": ["smartphone", "internet", "software", "startup", "mobile money app", "data centre", "artificial intelligence", "broadband", "computer", "satellite"],
    },
    "fra": {
        "sports": ["match de football", "championnat", "attaquant", "entraîneur", "stade", "coupe", "gardien de but", "marathon", "tournoi", "coup de sifflet final"],
        "politics": ["élection", "parlement", "président", "ministre", "parti d'opposition", "vote au sénat", "campagne", "gouverneur", "gouvernement", "scrutin"],
        "health": ["hôpital", "vaccin", "paludisme", "médecins", "clinique", "épidémie", "infirmières", "patients", "ministère de la santé", "médicaments"],
        "business": ["bourse", "banque", "inflation", "investisseurs", "accord commercial", "bénéfices", "banque centrale", "exportations", "monnaie", "prix du marché"],
        "technology": ["smartphone", "internet", "logiciel", "jeune pousse", "paiement mobile", "centre de données", "intelligence artificielle", "haut débit", "ordinateur", "satellite"],
    },
    "swa": {
        "sports": ["mechi ya mpira", "ligi kuu", "mshambuliaji", "kocha", "uwanja", "ubingwa", "kipa", "mbio za marathoni", "mashindano", "filimbi ya mwisho"],
        "politics": ["uchaguzi", "bunge", "rais", "waziri", "chama cha upinzani", "kura", "kampeni", "gavana", "baraza la mawaziri", "siasa"],
        "health": ["hospitali", "chanjo", "malaria", "madaktari", "zahanati", "mlipuko", "wauguzi", "wagonjwa", "wizara ya afya", "dawa"],
        "business": ["soko la hisa", "benki", "mfumuko wa bei", "wawekezaji", "biashara", "faida ya kampuni", "benki kuu", "mauzo ya nje", "sarafu", "bei sokoni"],
        "technology": ["simu janja", "mtandao", "programu", "kampuni changa", "pesa kwa simu", "kituo cha data", "akili bandia", "intaneti ya kasi", "kompyuta", "setilaiti"],
    },
    "hau": {
        "sports": ["wasan ƙwallon ƙafa", "gasar lig", "ɗan wasan gaba", "koci", "filin wasa", "kofin zakarun", "mai tsaron gida", "tseren gudu", "gasa", "busa ta ƙarshe"],
        "politics": ["zaɓe", "majalisa", "shugaban ƙasa", "minista", "jam'iyyar adawa", "ƙuri'a", "yaƙin neman zaɓe", "gwamna", "siyasa", "sanatoci"],
        "health": ["asibiti", "allurar rigakafi", "zazzaɓin cizon sauro", "likitoci", "cibiyar lafiya", "annoba", "ma'aikatan jinya", "marasa lafiya", "ma'aikatar lafiya", "magani"],
        "business": ["kasuwar hannun jari", "banki", "hauhawar farashi", "masu zuba jari", "kasuwanci", "ribar kamfani", "babban banki", "fitar da kaya", "kuɗin ƙasa", "farashin kaya"],
        "technology": ["wayar hannu", "intanet", "manhaja", "sabon kamfani", "kuɗi ta waya", "cibiyar bayanai", "fasahar zamani", "na'ura mai ƙwaƙwalwa", "kwamfuta", "tauraron ɗan adam"],
    },
    "yor": {
        "sports": ["ìdíje bọ́ọ̀lù", "líìgì", "agbábọ́ọ̀lù", "olùkọ́ni", "pápá ìṣeré", "ife ẹ̀yẹ", "góòlúkípà", "eré ìje", "ìdíje", "fèrè ìparí"],
        "politics": ["ìdìbò", "ilé aṣòfin", "ààrẹ", "mínísítà", "ẹgbẹ́ alátakò", "ìbò", "ìpolongo", "gómìnà", "òṣèlú", "aṣòfin"],
        "health": ["ilé ìwòsàn", "abẹ́rẹ́ àjẹsára", "ibà", "àwọn dókítà", "ilé ìtọ́jú", "àjàkálẹ̀ àrùn", "nọ́ọ̀sì", "aláìsàn", "ètò ìlera", "oògùn"],
        "business": ["ọjà ìpín", "ilé ìfowópamọ́", "ọ̀wọ́n gógó", "olùdókòwò", "òwò", "èrè ilé iṣẹ́", "banki àpapọ̀", "ọjà òkèèrè", "owó náírà", "iye ọjà"],
        "technology": ["fóònù alágbèéká", "ẹ̀rọ ayélujára", "ètò kọ̀mpútà", "ilé iṣẹ́ tuntun", "owó orí fóònù", "ibùdó dátà", "ọgbọ́n àtọwọ́dá", "íńtánẹ́ẹ̀tì", "kọ̀mpútà", "sátẹ́láìtì"],
    },
}

TEMPLATES = {
    "eng": ["{a} and {b} dominate headlines this week", "New report on {a} as {b} draws attention", "{a}: officials comment on {b} in the capital", "Why {a} matters after the {b} news", "Residents react to {a} and {b}"],
    "fra": ["{a} et {b} font la une cette semaine", "Nouveau rapport sur {a} alors que {b} attire l'attention", "{a} : les autorités commentent {b} dans la capitale", "Pourquoi {a} compte après l'annonce sur {b}", "Les habitants réagissent à {a} et {b}"],
    "swa": ["{a} na {b} vyatawala habari wiki hii", "Ripoti mpya kuhusu {a} huku {b} ikivutia watu", "{a}: maafisa wazungumzia {b} jijini", "Kwa nini {a} ni muhimu baada ya habari za {b}", "Wakazi waitikia {a} na {b}"],
    "hau": ["{a} da {b} sun mamaye labarai a wannan makon", "Sabon rahoto kan {a} yayin da {b} ke jan hankali", "{a}: jami'ai sun yi magana kan {b} a babban birni", "Dalilin da ya sa {a} ke da muhimmanci bayan labarin {b}", "Mazauna sun mayar da martani kan {a} da {b}"],
    "yor": ["{a} àti {b} gba àkọlé ìròyìn lọ́sẹ̀ yìí", "Ìròyìn tuntun lórí {a} bí {b} ṣe ń fa àfiyèsí", "{a}: àwọn aláṣẹ sọ̀rọ̀ lórí {b} nílùú", "Ìdí tí {a} fi ṣe pàtàkì lẹ́yìn ìròyìn {b}", "Àwọn olùgbé fèsì sí {a} àti {b}"],
}

# Unequal training data: high-resource languages get more (as in MasakhaNEWS vs English news).
TRAIN_SIZES = {"eng": 160, "fra": 120, "swa": 64, "hau": 48, "yor": 32}
EVAL_SIZE = 60
NOISE = 0.15  # chance that the second keyword comes from another topic


def make(language: str, rng: random.Random) -> list[dict]:
    rows = []
    for split, size in (("train", TRAIN_SIZES[language]), ("eval", EVAL_SIZE)):
        for i in range(size):
            topic = TOPICS[i % len(TOPICS)]
            a = rng.choice(VOCAB[language][topic])
            other = rng.choice(TOPICS) if rng.random() < NOISE else topic
            b = rng.choice(VOCAB[language][other])
            text = rng.choice(TEMPLATES[language]).format(a=a, b=b)
            rows.append({"split": split, "text": text[0].upper() + text[1:], "label": topic})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "securefpt" / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    for language in VOCAB:
        rows = make(language, random.Random(f"securefpt-demo-{language}"))
        with (out / f"{language}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(language, len(rows))


if __name__ == "__main__":
    main()
