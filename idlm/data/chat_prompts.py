"""A deterministic prompt set for self-distillation of a chat model (R-ISD drafter data, SPEC §5).

Why: an R-ISD drafter learns to predict what its own base model will say, so its training data is the
base model's responses to prompts like the ones it will serve. Real chat logs are not available
offline, so the prompts are built here from three sources, mixed with configurable weights:

- "instructions": documented functions mined with `ast` from this Python's stdlib + site-packages
  (`idlm.data.instructions`, files found as `idlm.data.corpus` finds them), each phrased as a natural
  request ("Write a Python function `name(args)` that ...", several phrasings);
- "synthetic": the checkable tasks of `idlm.data.synthetic` (arithmetic, expressions, copy, reverse);
  prompts equal to an eval task's are left out;
- "chat": general requests filled into templates from the topic lists below (explain X to an
  audience, write a poem/story/email, summarize, compare A and B, N tips, step-by-step how-to,
  rewrite/translate, Q&A, brainstorming, code questions in several languages, word problems, ...).

Every prompt is a dict {"id", "source", "kind", "messages": [{"role": "user", "content": ...}],
"split"}. `split` is "heldout" when a sha256 of the prompt text falls below `heldout_fraction`, so the
same text lands in the same split in every build, whatever the seed or the mix. Texts are
de-duplicated; texts containing a special-token marker ("<|") are dropped (they would forge turns in
a ChatML template). `build_prompts(n, seed)` is a pure function of its arguments and of the Python
files installed (the instruction source), so ship the written prompt set (`write_prompts`) to
reproduce a run on another machine.
"""

from __future__ import annotations

import ast
import os
import random
import re
import warnings
from typing import Iterable

from idlm.data import DataError
from idlm.data.io import read_jsonl, sha256_text, unit_hash, write_jsonl
from idlm.errors import ConfigError

SOURCES = ("chat", "instructions", "synthetic")
DEFAULT_WEIGHTS = {"chat": 0.55, "instructions": 0.30, "synthetic": 0.15}
HELDOUT_FRACTION = 0.02
_SPECIAL_MARKER = "<|"
_MAX_PROMPT_CHARS = 2000
_MAX_DOC_CHARS = 500
_PAIRS_PER_FILE = 8  # at most this many functions from one file (spreads the mix over packages)


# ---------------------------------------------------------------------------------------------
# split, ids, validation


def heldout_split(text: str, fraction: float) -> str:
    """'heldout' or 'train' from a sha256 of the prompt text alone (stable across builds and seeds)."""
    return "heldout" if unit_hash(f"idlm-chat-prompts/heldout/{text}") < fraction else "train"


def prompt_id(text: str) -> str:
    return sha256_text(text)[:16]


def make_prompt(text: str, source: str, kind: str, heldout_fraction: float) -> dict:
    return {"id": prompt_id(text), "source": source, "kind": kind,
            "messages": [{"role": "user", "content": text}], "split": heldout_split(text, heldout_fraction)}


def prompt_text(prompt: dict) -> str:
    """The user text of a prompt (its last user message)."""
    return next(m["content"] for m in reversed(prompt["messages"]) if m["role"] == "user")


def _usable(text: str) -> bool:
    return bool(text.strip()) and _SPECIAL_MARKER not in text and len(text) <= _MAX_PROMPT_CHARS


def check_prompts(prompts: list[dict]) -> list[dict]:
    """Validate a prompt set (DataError naming the first bad entry); returns it."""
    seen: set[str] = set()
    for i, p in enumerate(prompts):
        if not isinstance(p, dict):
            raise DataError(f"prompt {i} is not an object")
        msgs = p.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) and m["content"] for m in msgs):
            raise DataError(f"prompt {i}: 'messages' must be a non-empty list of {{role, content}} with "
                            "roles system/user/assistant and non-empty string contents")
        if msgs[-1]["role"] != "user":
            raise DataError(f"prompt {i}: the last message must be the user's (the model answers it)")
        if p.get("split", "train") not in ("train", "heldout"):
            raise DataError(f"prompt {i}: split must be 'train' or 'heldout', got {p.get('split')!r}")
        pid = p.get("id")
        if not isinstance(pid, str) or not pid:
            raise DataError(f"prompt {i}: 'id' must be a non-empty string")
        if pid in seen:
            raise DataError(f"prompt {i}: duplicate id {pid!r}")
        seen.add(pid)
    return prompts


def write_prompts(path: str, prompts: Iterable[dict]) -> int:
    """Write prompts as JSONL (atomically); each row also carries "prompt" (the user text) so the file
    works as `idlm eval alpha --chat --prompts FILE`."""
    return write_jsonl(path, ({**p, "prompt": prompt_text(p)} for p in prompts))


def read_prompts(path: str) -> list[dict]:
    """A prompt set written by `write_prompts` (or any JSONL of {"messages"} / {"prompt"} rows), validated.

    Rows with only "prompt" become one user message; missing ids come from the text's sha256, a missing
    split is "train" and a missing source "file".
    """
    out = []
    for row in read_jsonl(path):
        if isinstance(row, dict) and "messages" not in row and isinstance(row.get("prompt"), str):
            row = {**row, "messages": [{"role": "user", "content": row["prompt"]}]}
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise DataError(f"{path}: row {len(out) + 1} has neither 'messages' nor a 'prompt' string")
        row.pop("prompt", None)
        row.setdefault("source", "file")
        row.setdefault("split", "train")
        if "id" not in row:
            row["id"] = prompt_id("\n".join(str(m.get("content")) for m in row["messages"] if isinstance(m, dict)))
        out.append(row)
    try:
        return check_prompts(out)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# source 1: general chat prompts from templates

AUDIENCES = [
    "a five-year-old", "a ten-year-old", "a high school student", "a first-year university student",
    "a busy executive", "a software engineer", "my grandmother", "someone who has never heard of it",
    "a curious teenager", "a new employee", "a journalist", "a nurse", "a small business owner",
    "a history teacher", "an artist", "a retired engineer", "a non-native English speaker",
]
AUDIENCES_SELF = [
    "a complete beginner", "a high school student", "a software developer", "a retiree", "a nursing student",
    "a parent", "a manager with little technical background", "an artist", "a graduate student",
]
TOPICS = [
    "photosynthesis", "black holes", "inflation", "the French Revolution", "machine learning", "the water cycle",
    "supply and demand", "plate tectonics", "the immune system", "blockchain", "climate change", "DNA replication",
    "the stock market", "compound interest", "quantum entanglement", "the theory of evolution", "vaccines",
    "the internet", "encryption", "the Renaissance", "democracy", "the greenhouse effect", "neural networks",
    "the Roman Empire", "gravity", "electricity", "magnetism", "the periodic table", "antibiotic resistance",
    "the placebo effect", "opportunity cost", "the Industrial Revolution", "the Cold War", "photosynthesis in algae",
    "how vaccines are tested", "the carbon cycle", "ocean currents", "the human heart", "the nervous system",
    "sleep cycles", "meditation", "the scientific method", "probability", "statistics", "prime numbers",
    "the Pythagorean theorem", "calculus", "entropy", "relativity", "the Big Bang", "exoplanets", "the Moon's phases",
    "tides", "earthquakes", "volcanoes", "hurricanes", "renewable energy", "solar panels", "wind turbines",
    "nuclear power", "electric cars", "batteries", "recycling", "biodiversity", "coral reefs", "rainforests",
    "bees and pollination", "antibodies", "the gut microbiome", "nutrition labels", "protein", "carbohydrates",
    "metabolism", "exercise and the brain", "stress", "habits", "memory", "language learning", "bilingualism",
    "the printing press", "ancient Egypt", "the Silk Road", "the Great Depression", "World War I", "the Cold War",
    "the moon landing", "the United Nations", "human rights", "free speech", "taxes", "budgets", "credit scores",
    "mortgages", "index funds", "cryptocurrency", "supply chains", "globalization", "tariffs", "unemployment",
    "GDP", "interest rates", "central banks", "startups", "marketing", "branding", "negotiation", "leadership",
    "teamwork", "time management", "public speaking", "critical thinking", "logical fallacies", "philosophy",
    "stoicism", "utilitarianism", "ethics in artificial intelligence", "privacy online", "cybersecurity",
    "passwords", "two-factor authentication", "cloud computing", "operating systems", "compilers",
    "databases", "version control", "open source software", "APIs", "the HTTP protocol", "DNS", "Wi-Fi",
    "5G networks", "GPS", "satellites", "rockets", "the International Space Station", "Mars exploration",
    "telescopes", "microscopes", "cells", "mitosis", "genetics", "CRISPR", "proteins", "enzymes", "hormones",
    "allergies", "the common cold", "fever", "blood types", "the kidneys", "the lungs", "the skin",
    "the five senses", "color vision", "sound waves", "music theory", "rhythm", "jazz", "classical music",
    "impressionism", "perspective in drawing", "poetry meter", "storytelling", "the hero's journey",
    "Shakespeare's plays", "Greek mythology", "the Olympic Games", "chess openings", "the rules of soccer",
    "marathon training", "yoga", "gardening", "composting", "baking bread", "fermentation", "coffee roasting",
    "wine making", "cheese making", "urban planning", "public transportation", "architecture", "bridges",
    "skyscrapers", "3D printing", "robots", "self-driving cars", "drones", "smartphones", "touchscreens",
    "computer memory", "binary numbers", "algorithms", "sorting algorithms", "recursion", "big-O notation",
    "hash tables", "graphs in computer science", "search engines", "recommendation systems", "social media",
    "misinformation", "the attention economy", "remote work", "the four-day work week", "minimalism",
    "volunteering", "friendship", "empathy", "emotional intelligence", "motivation", "procrastination",
]
FORMS = [
    "short poem", "haiku", "limerick", "sonnet", "short story", "fable", "song chorus", "diary entry",
    "bedtime story", "free-verse poem", "two-sentence horror story", "motivational speech", "toast",
    "short fairy tale", "acrostic poem",
]
SUBJECTS = [
    "a rainy morning in the city", "a lost cat finding its way home", "the first day of spring",
    "an old lighthouse keeper", "a robot learning to paint", "friendship", "the ocean at night", "a busy train station",
    "a forgotten library", "the last leaf on a tree", "a dragon who is afraid of fire", "moving to a new country",
    "a grandmother's kitchen", "the night sky", "a city after a snowstorm", "a child's first bicycle ride",
    "a mountain village", "coffee", "a thunderstorm", "the smell of old books", "a fox in the snow",
    "a time traveler's regret", "an astronaut looking at Earth", "autumn leaves", "a garden in summer",
    "a retired firefighter", "a stray dog", "a lighthouse in a storm", "a message in a bottle", "the desert at dawn",
    "a street musician", "a small bakery", "a lonely satellite", "the sound of rain on a tin roof", "homesickness",
    "a long road trip", "a broken clock", "a kite on a windy day", "the first snowfall", "a paper boat",
    "a sleepy town", "a curious octopus", "a hidden door in the forest", "an unexpected letter", "a sunrise at sea",
    "an abandoned amusement park", "a chess game between old friends", "a penguin who wants to fly",
    "the end of summer vacation", "a new puppy", "a fisherman at dawn", "the moon talking to the sun",
    "a wizard who lost his memory", "learning to swim", "a family dinner", "a snowman melting",
    "a lighthouse that lost its light", "the courage to start over", "a music box", "an old photograph",
    "the wind", "a bee's busy day", "a quiet Sunday", "a city made of glass", "a ship in a bottle",
    "a mysterious stranger", "kindness", "hope", "patience", "gratitude", "a rocket launch", "an island",
    "a firefly", "a castle in the clouds", "a tea party", "a spider's web at dawn", "a marathon runner",
    "a school play", "a first job interview", "a farewell at an airport", "a cat who rules the house",
    "the ocean's depths", "a volcano waking up", "a lost umbrella", "a bicycle repair shop", "a winter market",
]
TONES = ["humorous", "melancholic", "hopeful", "formal", "playful", "mysterious", "nostalgic", "dramatic",
         "calm", "whimsical", "inspirational", "ironic"]
CONSTRAINTS = ["", "", "", " in exactly four lines", " for children", " that rhymes", " in under 100 words",
               " with a surprise ending", " told from the point of view of an animal", " with a happy ending"]
DOCUMENTS = ["email", "short letter", "polite message", "brief memo", "text message", "LinkedIn message"]
RECIPIENTS = ["my manager", "a customer", "my landlord", "a colleague", "my team", "a professor", "a neighbor",
              "a hiring manager", "a client", "a friend", "the school principal", "customer support"]
PURPOSES = [
    "asking for a day off next Friday", "apologizing for missing a meeting", "requesting a deadline extension",
    "thanking them for their help on a project", "declining an invitation politely", "asking for feedback",
    "announcing a new team member", "reporting a broken heater", "following up on a job application",
    "requesting a refund for a damaged product", "inviting them to a team lunch", "asking for a recommendation letter",
    "explaining a delay in shipping", "proposing a new meeting time", "congratulating them on a promotion",
    "asking to work from home two days a week", "introducing myself", "requesting a raise",
    "cancelling a subscription", "asking for clarification about an assignment", "welcoming them to the company",
    "summarizing the decisions of today's meeting", "reminding them about an unpaid invoice",
    "sharing the agenda for next week's workshop", "complaining about noise late at night",
    "saying goodbye before leaving the company", "asking for a quote for a kitchen renovation",
]
COMPARE_GROUPS = {
    "programming languages": ["Python", "JavaScript", "Java", "C++", "Rust", "Go", "C#", "Ruby", "Kotlin", "Swift"],
    "pets": ["cats", "dogs", "rabbits", "hamsters", "parrots", "goldfish", "turtles"],
    "cities": ["Paris", "London", "Tokyo", "New York", "Berlin", "Rome", "Sydney", "Toronto", "Barcelona", "Seoul"],
    "energy sources": ["solar power", "wind power", "nuclear power", "coal", "natural gas", "hydropower",
                       "geothermal energy"],
    "transport": ["trains", "planes", "cars", "bicycles", "buses", "electric scooters", "ferries"],
    "learning methods": ["reading books", "watching video courses", "taking classes in person", "learning by doing",
                         "studying with a tutor", "using flashcards"],
    "databases": ["PostgreSQL", "MySQL", "SQLite", "MongoDB", "Redis", "Cassandra"],
    "investments": ["stocks", "bonds", "real estate", "index funds", "gold", "savings accounts"],
    "diets": ["the Mediterranean diet", "a vegetarian diet", "a vegan diet", "a low-carb diet", "intermittent fasting"],
    "sports": ["soccer", "basketball", "tennis", "swimming", "running", "cycling", "chess"],
    "historical periods": ["the Middle Ages", "the Renaissance", "the Enlightenment", "the Industrial Revolution",
                           "ancient Greece", "ancient Rome"],
    "work styles": ["remote work", "office work", "hybrid work", "freelancing", "working at a startup",
                    "working at a large company"],
    "data formats": ["JSON", "XML", "YAML", "CSV", "Protocol Buffers"],
    "musical instruments": ["the piano", "the guitar", "the violin", "the drums", "the flute", "the ukulele"],
    "operating systems": ["Linux", "Windows", "macOS", "Android", "iOS"],
    "version control tools": ["Git", "Mercurial", "Subversion"],
    "web frameworks": ["Django", "Flask", "FastAPI", "React", "Vue", "Angular", "Ruby on Rails"],
    "beverages": ["coffee", "tea", "green tea", "hot chocolate", "orange juice", "sparkling water"],
}
PURPOSE_FOR = ["a beginner", "a small team", "a family with kids", "someone on a tight budget", "long-term use",
               "a weekend project", "a student", "a large company"]
GOALS = [
    "improve my sleep", "learn a new language", "save money on groceries", "stay focused while studying",
    "start running", "reduce stress at work", "write better emails", "keep my houseplants alive",
    "become a better public speaker", "make new friends in a new city", "eat more vegetables", "learn to code",
    "prepare for a job interview", "organize my closet", "travel on a budget", "read more books",
    "get better at chess", "take better photos with my phone", "be more productive in the morning",
    "stay motivated when working from home", "reduce my screen time", "drink more water", "learn to cook",
    "write a novel", "improve my handwriting", "remember names", "negotiate a salary", "plan a wedding",
    "save for retirement", "pay off debt", "start a podcast", "grow tomatoes", "train a puppy",
    "care for an elderly parent", "prepare for a marathon", "lower my electricity bill", "keep a journal",
    "meditate every day", "make my code more readable", "debug a program", "write good unit tests",
    "learn touch typing", "study for a math exam", "be a better listener", "give constructive feedback",
    "manage a small team", "run an effective meeting", "start a small business", "build a personal website",
    "learn to draw", "practice the guitar", "improve my posture", "cook healthy meals on a budget",
    "make my home more energy efficient", "reduce food waste", "stay safe online", "choose a good password",
    "keep my laptop running fast", "prepare for a long flight", "pack light for a trip", "host a dinner party",
    "teach a child to read", "help a friend who is sad", "handle a difficult conversation", "set goals for the year",
    "build a habit", "stop procrastinating", "survive a heat wave", "prepare for winter", "learn history",
]
TASKS = [
    "bake a loaf of bread", "change a flat tire", "set up a Python virtual environment",
    "make a cup of pour-over coffee",
    "plant a tree", "write a resume", "tie a tie", "boil an egg", "create a budget", "back up my phone",
    "clean a laptop keyboard", "make pancakes", "start a compost bin", "paint a room", "jump-start a car",
    "set up a home Wi-Fi network", "install a Linux distribution", "write a cover letter", "make a paper airplane",
    "brew green tea", "learn a song on the guitar", "prepare for a presentation", "file a bug report",
    "make a git commit", "create a pull request on GitHub", "sort a list in Python", "read a CSV file in Python",
    "make homemade pizza dough", "fold a fitted sheet", "care for a sourdough starter", "cook rice on the stove",
    "clean a cast iron pan", "write a haiku", "do a push-up correctly", "stretch after running", "wash a wool sweater",
    "replace a light switch safely", "unclog a sink", "make a simple website with HTML", "take a screenshot",
    "organize files on my computer", "prepare a vegetable garden bed", "make a smoothie", "iron a shirt",
    "write a thank-you note", "plan a week of meals", "practice mindful breathing", "learn the multiplication tables",
    "solve a quadratic equation", "convert Celsius to Fahrenheit", "calculate a tip at a restaurant",
    "make a cup of tea", "set up a fish tank", "write a short speech", "prepare for a job interview",
]
WHY_QUESTIONS = [
    "is the sky blue", "do leaves change color in autumn", "do we dream", "is the ocean salty", "do cats purr",
    "do we have seasons", "does ice float", "do onions make you cry", "do birds migrate", "do we yawn",
    "is sleep important", "does bread rise", "do stars twinkle", "does the Moon have phases", "do we get hiccups",
    "is exercise good for the brain", "do computers use binary", "do airplanes fly", "do magnets attract iron",
    "do some people need glasses", "is water important for the body", "do bubbles pop", "do dogs wag their tails",
    "is biodiversity important", "do prices go up over time", "do we need vitamins", "do rainbows form",
    "does metal feel cold", "do we have fingerprints", "is the Dead Sea so salty", "do volcanoes erupt",
    "do zebras have stripes", "does popcorn pop", "do we blush", "do plants need sunlight",
]
MECHANISMS = [
    "a refrigerator", "a microwave oven", "a car engine", "a solar panel", "a vaccine", "a search engine",
    "a credit card payment", "a bicycle gear", "a rainbow", "an elevator", "a compass", "a thermostat",
    "a camera", "a touchscreen", "public-key encryption", "a hash function", "a neural network", "a heat pump",
    "an electric motor", "a nuclear reactor", "a lock and key", "a wind turbine", "the human eye", "the ear",
    "a loan", "an auction", "an election", "a garbage collector in programming", "a web browser", "email",
    "a QR code", "noise-cancelling headphones", "a pressure cooker", "a smoke detector", "a barcode scanner",
]
PEOPLE = [
    "Marie Curie", "Albert Einstein", "Ada Lovelace", "Leonardo da Vinci", "Isaac Newton", "Cleopatra",
    "Nelson Mandela", "Mahatma Gandhi", "Charles Darwin", "Alan Turing", "Frida Kahlo", "William Shakespeare",
    "Galileo Galilei", "Nikola Tesla", "Rosalind Franklin", "Martin Luther King Jr.", "Jane Austen",
    "Ludwig van Beethoven", "Wolfgang Amadeus Mozart", "Confucius", "Aristotle", "Plato", "Socrates",
    "Julius Caesar", "Napoleon Bonaparte", "Queen Victoria", "Abraham Lincoln", "Grace Hopper",
    "Katherine Johnson", "Johannes Gutenberg", "Florence Nightingale", "Louis Pasteur", "Gregor Mendel",
    "Vincent van Gogh", "Pablo Picasso", "Amelia Earhart", "Neil Armstrong", "Yuri Gagarin", "Carl Sagan",
    "Dmitri Mendeleev", "Alexander Fleming", "Simone de Beauvoir", "Rumi", "Ibn Sina", "Hypatia",
]
COUNTRIES = [
    "France", "Japan", "Brazil", "Canada", "Australia", "Egypt", "Kenya", "India", "Mexico", "Germany", "Italy",
    "Spain", "Norway", "Argentina", "Chile", "Peru", "Vietnam", "Thailand", "Indonesia", "Morocco", "Nigeria",
    "South Africa", "Turkey", "Greece", "Poland", "Sweden", "Finland", "Portugal", "Ireland", "New Zealand",
    "South Korea", "Colombia", "Ghana", "Ethiopia", "the Netherlands", "Switzerland", "Austria", "Iceland",
]
COUNTRY_QUESTIONS = [
    "What is the capital of {country}?", "What language is spoken in {country}?",
    "Tell me three interesting facts about {country}.", "What is {country} famous for?",
    "What is the climate like in {country}?", "Describe a traditional dish from {country}.",
    "What should a tourist know before visiting {country}?", "Give a short overview of the history of {country}.",
]
SENTENCES = [
    "The meeting was moved to Thursday because the manager was sick.",
    "I can't come to the party tonight, I have too much work.",
    "Our new product helps people save time when they cook dinner.",
    "The weather was bad so we stayed inside and played board games.",
    "Please send me the report by the end of the day.",
    "The museum is closed on Mondays but open late on Fridays.",
    "He was very tired after the long flight from Tokyo.",
    "We need to reduce costs without hurting the quality of our service.",
    "The library has thousands of books and a quiet reading room.",
    "She learned to play the piano when she was seven years old.",
    "Thank you for your help with the project last week.",
    "The train was late again and I missed the start of the class.",
    "Our team finished the project two weeks ahead of schedule.",
    "I think we should try the new restaurant near the park.",
    "The software update fixed several bugs and improved battery life.",
    "It is important to drink water and get enough sleep.",
    "The children built a sandcastle on the beach all afternoon.",
    "The company will open a new office in Berlin next year.",
    "My phone battery dies very quickly since the last update.",
    "The concert was amazing and the crowd sang along to every song.",
    "Please remember to turn off the lights when you leave the room.",
    "The new policy applies to all employees starting next month.",
    "We are sorry for the inconvenience and are working on a fix.",
    "The garden looks beautiful now that the roses are blooming.",
    "I have been learning Spanish for three months.",
    "The price of coffee has gone up a lot this year.",
    "The cat sleeps on the windowsill every afternoon.",
    "Can you help me move the sofa on Saturday?",
    "The results of the experiment were surprising.",
    "Good communication is the key to a successful team.",
]
BAD_SENTENCES = [
    "me and him goes to the store yesterday", "their going to be late for they're meeting",
    "she dont like apples but she like oranges", "the informations you send was very helpful",
    "I has finished my homework already", "we was very exciting about the trip",
    "the dog wagged it's tail when he seen me", "less people came to the event then we expected",
    "him and me is best friends since childhood", "everyone have to bring their own lunch tomorrow",
    "the childs played in the park all day", "I should of called you earlier",
    "between you and I, the plan are not good", "she runned to the bus but it already leaved",
]
STYLES = ["formal", "friendly", "concise", "persuasive", "polite", "enthusiastic", "professional", "simple",
          "poetic", "funny", "confident", "neutral"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Chinese", "Japanese", "Korean",
             "Russian", "Arabic", "Hindi"]
BRAINSTORM = [
    "a birthday party for a ten-year-old", "a science fair project", "a team-building activity",
    "a blog about cooking", "a rainy weekend at home", "a small garden on a balcony", "a mobile app",
    "a short film", "a fundraising event for a school", "a podcast about history", "a company retreat",
    "a gift for a friend who loves books", "a healthy breakfast", "a date night at home", "a board game",
    "a YouTube channel about science", "a new coffee shop", "reducing plastic at home", "a summer reading list",
    "a classroom activity about fractions", "a themed dinner party", "a Halloween costume", "a hackathon project",
    "a community event in a park", "a newsletter for a local library", "a travel itinerary in Italy",
    "names for a bakery", "names for a pet turtle", "names for a fantasy kingdom", "names for a productivity app",
    "slogans for a bike shop", "questions to ask in a job interview", "icebreaker questions for a meeting",
    "topics for a persuasive essay", "ways to celebrate a colleague's success", "uses for an old jar",
]
CODE_LANGUAGES = ["Python", "JavaScript", "TypeScript", "Java", "C", "C++", "Rust", "Go", "C#", "Ruby", "Kotlin",
                  "Swift", "PHP", "Haskell", "Scala", "Julia"]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a string", "finds the largest element in a list", "removes duplicates from a list",
    "checks whether a string is a palindrome", "computes the factorial of a number", "sorts a list of numbers",
    "merges two sorted lists", "converts Celsius to Fahrenheit", "counts the words in a sentence",
    "finds the second largest number in an array", "computes the greatest common divisor of two numbers",
    "checks whether two strings are anagrams", "flattens a nested list", "returns the sum of the digits of a number",
    "implements binary search", "reads a file and prints the number of lines", "validates an email address",
    "converts a decimal number to binary", "capitalizes the first letter of each word",
    "finds the most frequent element in a list", "rotates an array by k positions", "computes the average of a list",
    "generates all permutations of a string", "checks whether a year is a leap year", "implements a stack",
    "implements a queue", "computes the power set of a set", "transposes a matrix", "multiplies two matrices",
    "counts the occurrences of each character in a string", "removes whitespace from both ends of a string",
    "implements bubble sort", "implements quicksort", "implements merge sort", "parses a date string",
    "returns the prime factors of a number", "checks whether parentheses in a string are balanced",
    "converts a Roman numeral to an integer", "computes the distance between two points",
    "finds the intersection of two lists", "chunks a list into groups of size n", "computes a running total",
    "generates a random password", "implements a simple linked list", "finds the longest word in a sentence",
]
CODE_HOWTOS = [
    "read a file line by line", "make an HTTP request", "handle exceptions", "sort a dictionary by value",
    "parse JSON", "write to a file", "iterate over a map", "format a string", "get the current date and time",
    "split a string", "join a list of strings", "create a class", "use a hash map", "define a function with default "
    "arguments", "run code in parallel", "read command-line arguments", "generate random numbers",
    "measure how long a function takes", "create a unit test", "use regular expressions",
    "convert a string to a number", "remove an item from a list", "copy an array", "check if a key exists in a map",
]
CODE_CONCEPTS = [
    "a closure", "recursion", "a generator", "an interface", "inheritance", "polymorphism", "a pointer",
    "immutability", "a lambda function", "asynchronous programming", "a race condition", "memoization",
    "dependency injection", "a decorator", "pattern matching", "type inference", "garbage collection",
    "an iterator", "a mutex", "a hash function", "a linked list", "a binary tree", "a REST API", "a unit test",
    "exception handling", "a module", "a virtual environment", "a thread", "an enum", "a null reference",
]
CODE_PAIRS = [
    ("a list", "a tuple"), ("a process", "a thread"), ("an abstract class", "an interface"),
    ("pass by value", "pass by reference"), ("a stack", "a queue"), ("compilation", "interpretation"),
    ("static typing", "dynamic typing"), ("an array", "a linked list"), ("a shallow copy", "a deep copy"),
    ("concurrency", "parallelism"), ("SQL", "NoSQL databases"), ("a class", "an object"),
    ("a function", "a method"), ("synchronous code", "asynchronous code"), ("a library", "a framework"),
]
NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe"]
ITEMS = ["apples", "marbles", "books", "stickers", "pencils", "cookies", "coins", "stamps", "cards", "balloons",
         "oranges", "toy cars", "seashells", "candles", "cupcakes", "notebooks"]
UNITS = [("meters", "kilometers", 1000), ("centimeters", "meters", 100), ("minutes", "hours", 60),
         ("seconds", "minutes", 60), ("grams", "kilograms", 1000), ("milliliters", "liters", 1000),
         ("inches", "feet", 12), ("hours", "days", 24), ("months", "years", 12), ("days", "weeks", 7)]
REVIEW_PRODUCTS = ["phone", "hotel room", "pizza", "laptop", "movie", "book", "pair of shoes", "coffee maker",
                   "headphones", "restaurant", "backpack", "video game", "vacuum cleaner", "bike"]
REVIEW_GOOD = ["fantastic", "reliable", "delicious", "comfortable", "well made", "fast", "beautiful", "great value"]
REVIEW_BAD = ["disappointing", "broken", "overpriced", "uncomfortable", "slow", "noisy", "cold", "poorly made"]
REVIEW_MIXED = ["okay", "average", "fine", "not bad", "what I expected"]
ROLES = ["a teacher and a student", "a doctor and a patient", "two astronauts", "a customer and a barista",
         "a detective and a witness", "a grandparent and a grandchild", "two robots", "a chef and a food critic",
         "a job candidate and an interviewer", "two friends planning a trip", "a cat and a dog",
         "a tourist and a local guide"]
PERSONAS = ["a pirate captain", "a medieval knight", "a friendly tour guide", "a Shakespearean actor",
            "a sports commentator", "a wise old wizard", "a news reporter", "a museum curator",
            "a personal trainer", "a detective from the 1920s"]
DECISIONS = [
    "buying a used car", "choosing a university", "adopting a dog", "moving to another city", "changing careers",
    "renting versus buying a home", "starting a business", "choosing a laptop for programming",
    "picking a programming language to learn first", "planning a trip abroad", "buying a bicycle",
    "choosing a health insurance plan", "signing a lease", "accepting a job offer", "learning a musical instrument",
    "hiring a freelancer", "choosing a database for a web app", "buying a smartphone", "switching banks",
]
NUMBERS = [3, 3, 4, 5, 5, 5, 6, 7, 8, 10]


def _pick(rng: random.Random, items):
    return items[rng.randrange(len(items))]


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _explain(rng):
    t, aud, me = _pick(rng, TOPICS), _pick(rng, AUDIENCES), _pick(rng, AUDIENCES_SELF)
    return _pick(rng, [
        f"Explain {t} to {aud}.", f"Can you explain {t} in simple terms?",
        f"How would you describe {t} to {aud}?", f"What is {t}, and why does it matter?",
        f"Give me a short explanation of {t} suitable for {aud}.", f"I'm {me}. Help me understand {t}.",
        f"Explain {t} to {aud} using an analogy.", f"What are the most important things to know about {t}?",
        f"Teach me the basics of {t} in a few paragraphs.", f"What are common misconceptions about {t}?",
    ])


def _write(rng):
    form, subj, tone, c = _pick(rng, FORMS), _pick(rng, SUBJECTS), _pick(rng, TONES), _pick(rng, CONSTRAINTS)
    return _pick(rng, [
        f"Write {_a(form)} about {subj}{c}.", f"Compose {_a(form)} about {subj} in {_a(tone)} tone.",
        f"Could you write {_a(form)} about {subj}?", f"Write {_a(tone)} {form} about {subj}.",
        f"I need {_a(form)} about {subj}{c}. Can you write one?",
    ])


def _letter(rng):
    doc, to, why, style = _pick(rng, DOCUMENTS), _pick(rng, RECIPIENTS), _pick(rng, PURPOSES), _pick(rng, STYLES)
    return _pick(rng, [
        f"Write {_a(doc)} to {to} {why}.", f"Draft {_a(style)} {doc} to {to} {why}.",
        f"Help me write {_a(doc)} to {to} {why}. Keep it short.",
        f"Can you write {_a(doc)} for me? I'm writing to {to}, {why}.",
    ])


def _summary(rng):
    t, n = _pick(rng, TOPICS), _pick(rng, NUMBERS)
    return _pick(rng, [
        f"Summarize the key ideas of {t} in {n} sentences.", f"Give me a {n}-bullet summary of {t}.",
        f"Write a one-paragraph overview of {t}.", f"What are the {n} most important facts about {t}?",
        f"Summarize {t} for {_pick(rng, AUDIENCES)} in under 100 words.",
        f"Create a short study guide about {t} with {n} key points.",
    ])


def _compare(rng):
    group = _pick(rng, sorted(COMPARE_GROUPS))
    a, b = rng.sample(COMPARE_GROUPS[group], 2)
    p = _pick(rng, PURPOSE_FOR)
    return _pick(rng, [
        f"Compare {a} and {b}.", f"What are the differences between {a} and {b}?",
        f"{_cap(a)} or {b}: which is better for {p}?", f"What are the pros and cons of {a} versus {b}?",
        f"Make a short table comparing {a} and {b}.", f"How are {a} and {b} similar, and how are they different?",
    ])


def _tips(rng):
    g, n = _pick(rng, GOALS), _pick(rng, NUMBERS)
    return _pick(rng, [
        f"Give me {n} tips to {g}.", f"What are {n} ways to {g}?", f"How can I {g}? List {n} suggestions.",
        f"I want to {g}. Where should I start?", f"What are common mistakes people make when they try to {g}?",
        f"Make a simple {n}-day plan to help me {g}.",
    ])


def _howto(rng):
    t = _pick(rng, TASKS)
    return _pick(rng, [
        f"How do I {t}? Explain step by step.", f"Write step-by-step instructions for how to {t}.",
        f"What are the steps to {t}?", f"Explain to a beginner how to {t}.",
        f"What do I need to {t}, and how do I do it?",
    ])


def _rewrite(rng):
    s, style, lang = _pick(rng, SENTENCES), _pick(rng, STYLES), _pick(rng, LANGUAGES)
    return _pick(rng, [
        f'Rewrite this sentence to sound more {style}: "{s}"', f"Make the following text more {style}:\n\n{s}",
        f"Paraphrase this sentence: {s}", f'Translate the following sentence into {lang}: "{s}"',
        f"Fix the grammar in this sentence: {_pick(rng, BAD_SENTENCES)}",
        f'Shorten this sentence without losing its meaning: "{s}"', f"Turn this sentence into a question: {s}",
        f'Rewrite "{s}" for {_pick(rng, AUDIENCES)}.',
    ])


def _qa(rng):
    kind = rng.randrange(5)
    if kind == 0:
        return f"Why {_pick(rng, WHY_QUESTIONS)}?"
    if kind == 1:
        return _pick(rng, ["How does {} work?", "Explain how {} works.", "What happens inside {} when you use it?"]
                     ).format(_pick(rng, MECHANISMS))
    if kind == 2:
        return _pick(rng, ["Who was {}?", "What is {} best known for?", "Write a short biography of {}.",
                           "What can we learn from the life of {}?"]).format(_pick(rng, PEOPLE))
    if kind == 3:
        return _pick(rng, COUNTRY_QUESTIONS).format(country=_pick(rng, COUNTRIES))
    return _pick(rng, ["What is {}?", "Define {} in one sentence.", "What is the history of {}?"]
                 ).format(_pick(rng, TOPICS))


def _brainstorm(rng):
    b, n = _pick(rng, BRAINSTORM), _pick(rng, NUMBERS)
    return _pick(rng, [f"List {n} ideas for {b}.", f"Brainstorm {n} ideas for {b}.",
                       f"Can you suggest {n} creative ideas for {b}?", f"Give me {n} suggestions: {b}."])


def _code(rng):
    lang, task = _pick(rng, CODE_LANGUAGES), _pick(rng, CODE_TASKS)
    kind = rng.randrange(9)
    if kind == 6:
        return f"Write unit tests in {lang} for a function that {task}."
    if kind == 7:
        return f"How would you write {lang} code that {task}? Explain the approach before the code."
    if kind == 8:
        return _pick(rng, [f"What is the time complexity of a good algorithm that {task}? Explain why.",
                           f"Describe, without code, an efficient algorithm that {task}."])
    if kind == 0:
        return f"Write a {lang} function that {task}."
    if kind == 1:
        return f"Write a short {lang} program that {task}, and explain how it works."
    if kind == 2:
        return f"How do I {_pick(rng, CODE_HOWTOS)} in {lang}?"
    if kind == 3:
        return f"Explain what {_pick(rng, CODE_CONCEPTS)} is in {lang}, with a small example."
    if kind == 4:
        a, b = _pick(rng, CODE_PAIRS)
        return f"What is the difference between {a} and {b} in {lang}?"
    return f"Write a function that {task}. Use {lang} and add comments."


def _math(rng):
    kind = rng.randrange(4)
    if kind == 0:
        name, item = _pick(rng, NAMES), _pick(rng, ITEMS)
        a, b, c = rng.randint(3, 60), rng.randint(2, 40), rng.randint(1, 20)
        return _pick(rng, [
            f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
            f"{name} had {a + c} {item} and gave {c} to a friend. How many are left?",
            f"{name} packs {a * b} {item} into boxes of {b}. How many boxes are needed?",
            f"There are {a} {item} in each bag and {b} bags. How many {item} are there in total? Show your work.",
        ])
    if kind == 1:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        return f"Solve for x: {a}x + {b} = {a * x + b}. Explain each step."
    if kind == 2:
        small, big, factor = _pick(rng, UNITS)
        n = rng.randint(2, 50)
        return _pick(rng, [f"How many {small} are in {n} {big}?", f"Convert {n * factor} {small} to {big}."])
    price, pct = rng.randint(10, 500), _pick(rng, [5, 10, 15, 20, 25, 30, 40, 50])
    return _pick(rng, [f"A jacket costs ${price} and is on sale for {pct}% off. What is the sale price?",
                       f"What is {pct}% of {price}?",
                       f"If I save ${price} a month, how much will I have after {pct} months?"])


def _classify(rng):
    prod = _pick(rng, REVIEW_PRODUCTS)
    mood = rng.randrange(3)
    adjs = REVIEW_GOOD if mood == 0 else REVIEW_BAD if mood == 1 else REVIEW_MIXED
    a, b = rng.sample(adjs, 2)
    review = f"The {prod} was {a} and {b}."
    return _pick(rng, [
        f'Classify the sentiment of this review as positive, negative or neutral: "{review}"',
        f'Is this review positive or negative? "{review}" Explain briefly.',
        f'Write a polite reply from the company to this customer review: "{review}"',
    ])


def _roleplay(rng):
    kind = rng.randrange(3)
    if kind == 0:
        return f"Write a short dialogue between {_pick(rng, ROLES)} about {_pick(rng, TOPICS)}."
    if kind == 1:
        return f"Pretend you are {_pick(rng, PERSONAS)}. Explain {_pick(rng, TOPICS)} in character."
    return f"What should I consider when {_pick(rng, DECISIONS)}?"


CHAT_KINDS = {  # kind: (generator, weight)
    "explain": (_explain, 12), "write": (_write, 10), "letter": (_letter, 6), "summary": (_summary, 6),
    "compare": (_compare, 7), "tips": (_tips, 8), "howto": (_howto, 6), "rewrite": (_rewrite, 7),
    "qa": (_qa, 10), "brainstorm": (_brainstorm, 6), "code": (_code, 12), "math": (_math, 5),
    "classify": (_classify, 3), "roleplay": (_roleplay, 4),
}


def chat_prompts(n: int, seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION,
                 exclude: set[str] | None = None) -> list[dict]:
    """n distinct template prompts (fewer only if the templates run out), kinds drawn by weight."""
    rng = random.Random(f"idlm-chat-prompts/{seed}/chat")
    kinds = sorted(CHAT_KINDS)
    weights = [CHAT_KINDS[k][1] for k in kinds]
    seen = set(exclude or ())
    out: list[dict] = []
    attempts, max_attempts = 0, 50 * n + 1000
    while len(out) < n and attempts < max_attempts:
        attempts += 1
        kind = rng.choices(kinds, weights)[0]
        text = CHAT_KINDS[kind][0](rng)
        if text in seen or not _usable(text):
            continue
        seen.add(text)
        out.append(make_prompt(text, "chat", kind, heldout_fraction))
    return out


# ---------------------------------------------------------------------------------------------
# source 2: synthetic tasks


def synthetic_prompts(n: int, seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION,
                      exclude: set[str] | None = None) -> list[dict]:
    """n distinct synthetic task prompts (kinds round-robin), none equal to an eval task's prompt."""
    from idlm.data.build import _committed_prompts
    from idlm.data.synthetic import eval_tasks, make_split

    banned = set(exclude or ()) | {t["prompt"] for t in eval_tasks()} | _committed_prompts()
    out: list[dict] = []
    want = n
    while len(out) < n:
        out = []
        seen = set(banned)
        for t in make_split(want + 16, seed, "train"):
            if t["prompt"] in seen or not _usable(t["prompt"]):
                continue
            seen.add(t["prompt"])
            out.append(make_prompt(t["prompt"], "synthetic", t["kind"], heldout_fraction))
            if len(out) == n:
                break
        want = want * 2 + 16  # a longer split extends a shorter one: retry with more
    return out


# ---------------------------------------------------------------------------------------------
# source 3: instruction prompts mined from Python source

_HEADER_PREFIX, _HEADER_SUFFIX = "Write the Python function with this signature and docstring:\n```python\n", "\n```"
_VERBS = {"return": "returns", "get": "gets", "compute": "computes", "create": "creates", "check": "checks",
          "convert": "converts", "parse": "parses", "build": "builds", "make": "makes", "find": "finds",
          "add": "adds", "remove": "removes", "load": "loads", "read": "reads", "write": "writes",
          "generate": "generates", "determine": "determines", "calculate": "calculates", "split": "splits",
          "format": "formats", "validate": "validates", "update": "updates", "apply": "applies",
          "extract": "extracts", "normalize": "normalizes", "test": "tests", "set": "sets", "print": "prints",
          "construct": "constructs", "decode": "decodes", "encode": "encodes", "evaluate": "evaluates",
          "initialize": "initializes", "raise": "raises", "yield": "yields", "count": "counts", "join": "joins",
          "replace": "replaces", "resolve": "resolves", "strip": "strips", "sort": "sorts", "merge": "merges",
          "copy": "copies", "insert": "inserts", "append": "appends", "open": "opens", "close": "closes",
          "run": "runs", "call": "calls", "handle": "handles", "process": "processes", "emit": "emits",
          "send": "sends", "register": "registers", "wrap": "wraps", "filter": "filters", "match": "matches"}
_WS = re.compile(r"\s+")


def _doc_summary(doc: str) -> str:
    """The docstring's first paragraph, whitespace collapsed, cut at a sentence end near _MAX_DOC_CHARS."""
    para = _WS.sub(" ", doc.strip().split("\n\n")[0]).strip()
    if len(para) > _MAX_DOC_CHARS:
        cut = para.rfind(". ", 0, _MAX_DOC_CHARS)
        para = para[: cut + 1] if cut > 40 else para[:_MAX_DOC_CHARS].rsplit(" ", 1)[0] + " ..."
    return para


def _phrase_instruction(pair: dict, rng: random.Random) -> str | None:
    """A natural request for one mined pair (None if the pair is unsuitable)."""
    user = pair["user"]
    if not (user.startswith(_HEADER_PREFIX) and user.endswith(_HEADER_SUFFIX)):
        return None
    header = user[len(_HEADER_PREFIX): -len(_HEADER_SUFFIX)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            node = ast.parse(header).body[0]
    except (SyntaxError, ValueError, RecursionError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    qual = pair["name"]
    if node.name.startswith("test") or qual.startswith("Test"):
        return None  # test functions are not requests anyone makes
    doc = ast.get_docstring(node) or ""
    summary = _doc_summary(doc)
    if len(summary) < 15 or len(summary.split()) < 3:
        return None
    if summary[-1] not in ".!?:":
        summary += "."
    sig = f"{node.name}({ast.unparse(node.args)})"
    if node.returns is not None:
        sig += f" -> {ast.unparse(node.returns)}"
    owner = qual.split(".")[0] if "." in qual else None
    kind = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    first, _, rest = summary.partition(" ")
    verb = _VERBS.get(first.lower())
    if first.lower().endswith("s") and first.lower()[:-1] in _VERBS:
        verb = first.lower()
    if len(sig) > 160:
        return user  # the author's own header (quoting a long signature beats paraphrasing it)
    if owner is not None:
        options = [f"Write the {kind}method `{sig}` of the Python class `{owner}`. {summary}",
                   f"Implement `{owner}.{node.name}` in Python, with the signature `{sig}`. "
                   f"It should do this: {summary}"]
    else:
        options = [f"Write a Python {kind}function `{sig}`. Here is what it should do: {summary}",
                   f"Implement the Python {kind}function `{sig}`: {summary}",
                   f"I need a Python {kind}function called `{node.name}`. {summary} Please write it."]
        if verb is not None:
            options.append(f"Write a Python {kind}function `{sig}` that {verb} {rest}".rstrip())
        if len(doc.strip()) <= 2 * _MAX_DOC_CHARS:
            options.append(f"Can you write `{sig}` in Python? Its docstring says:\n\n{doc.strip()}")
    if len(header) <= 3 * _MAX_DOC_CHARS:
        options.append(user)
    return _pick(rng, options)


def _mine_file(args: tuple[str, str]) -> list[dict]:
    """Instruction pairs of one file (worker process; [] for unreadable, non-UTF-8 or generated files)."""
    from idlm.data.corpus import looks_generated
    from idlm.data.instructions import mine_source

    path, rel = args
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if "\x00" in text or looks_generated(text):
        return []
    return mine_source(text, rel)[:_PAIRS_PER_FILE]


def source_files(roots: list[str] | None = None, max_file_bytes: int = 200_000) -> list[tuple[str, str]]:
    """(absolute path, root-relative path) of the *.py files `idlm.data.corpus` would consider, sorted."""
    from idlm.data import corpus as corpus_mod

    roots = corpus_mod._resolve_roots(roots)
    real = [os.path.realpath(r) for r in roots]
    out = []
    for i, root in enumerate(roots):
        others = frozenset(r for j, r in enumerate(real) if j != i and r.startswith(real[i] + os.sep))
        for rel, size in corpus_mod._walk(root, others, {}):
            if 0 < size <= max_file_bytes:
                out.append((os.path.join(root, *rel.split("/")), rel))
    return out


def instruction_prompts(n: int, seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION,
                        roots: list[str] | None = None, workers: int | None = None, exclude: set[str] | None = None,
                        progress: bool = False) -> list[dict]:
    """Up to n distinct instruction prompts from documented functions, files visited in a seeded hash order
    (mining stops once enough are found), one phrasing per function."""
    from tqdm import tqdm

    from idlm.data.parallel import default_workers, process_pool

    if n <= 0:
        return []
    files = sorted(source_files(roots), key=lambda f: (unit_hash(f"idlm-chat-prompts/{seed}/files/{f[1]}"), f[1]))
    rng = random.Random(f"idlm-chat-prompts/{seed}/instructions")
    seen = set(exclude or ())
    seen_fn: set[str] = set()
    out: list[dict] = []
    workers = default_workers() if workers is None else workers
    bar = tqdm(total=n, desc="prompts: mine instructions", unit="prompt", disable=not progress)
    with process_pool(workers if len(files) >= 64 else 1) as imap:
        for pairs in imap(_mine_file, files):
            for pair in pairs:
                fn = pair["assistant"]
                if fn in seen_fn:
                    continue
                seen_fn.add(fn)
                text = _phrase_instruction(pair, rng)
                if text is None or text in seen or not _usable(text):
                    continue
                seen.add(text)
                out.append(make_prompt(text, "instructions", "function", heldout_fraction))
                bar.update(1)
                if len(out) >= n:
                    break
            if len(out) >= n:
                break
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# the mix


def _counts(n: int, weights: dict[str, float]) -> dict[str, int]:
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], k))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def check_weights(weights: dict[str, float] | None) -> dict[str, float]:
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    for k, w in weights.items():
        if k not in SOURCES:
            raise ConfigError(f"unknown prompt source {k!r}; choose from {', '.join(SOURCES)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"the weight of source {k!r} must be a number >= 0, got {w!r}")
    if not any(w > 0 for w in weights.values()):
        raise ConfigError("at least one prompt source needs a positive weight")
    return {k: float(w) for k, w in weights.items() if w > 0}


def build_prompts(n: int, seed: int = 0, weights: dict[str, float] | None = None,
                  heldout_fraction: float = HELDOUT_FRACTION, roots: list[str] | None = None,
                  workers: int | None = None, progress: bool = False) -> list[dict]:
    """n distinct prompts mixed from the sources by weight, in a seeded shuffled order.

    If the instruction source finds fewer functions than its share, the shortfall is filled with chat
    prompts (then synthetic ones), so the set still has n prompts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of prompts must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0 <= heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    counts = _counts(n, check_weights(weights))
    prompts: list[dict] = []
    seen: set[str] = set()

    def add(items: list[dict]) -> None:
        for p in items:
            t = prompt_text(p)
            if t not in seen:
                seen.add(t)
                prompts.append(p)

    if counts.get("instructions"):
        add(instruction_prompts(counts["instructions"], seed, heldout_fraction, roots, workers, seen, progress))
    if counts.get("synthetic"):
        add(synthetic_prompts(counts["synthetic"], seed, heldout_fraction, seen))
    if len(prompts) < n:  # chat's share, plus what the instruction source could not supply
        add(chat_prompts(n - len(prompts), seed, heldout_fraction, seen))
    if len(prompts) < n:  # the templates ran out: more synthetic tasks
        add(synthetic_prompts(n - len(prompts), seed, heldout_fraction, seen))
    if len(prompts) < n:
        raise DataError(f"could only build {len(prompts)} distinct prompts of the {n} asked")
    random.Random(f"idlm-chat-prompts/{seed}/order").shuffle(prompts)
    return prompts


def summarize(prompts: Iterable[dict]) -> dict:
    """Counts per source, per split and per (source, kind)."""
    out: dict = {"total": 0, "sources": {}, "splits": {}, "kinds": {}}
    for p in prompts:
        out["total"] += 1
        for key, val in (("sources", p.get("source")), ("splits", p.get("split")),
                         ("kinds", f"{p.get('source')}/{p.get('kind')}")):
            out[key][val] = out[key].get(val, 0) + 1
    for key in ("sources", "splits", "kinds"):
        out[key] = dict(sorted(out[key].items()))
    return out

