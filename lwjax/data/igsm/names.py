"""Name vocabularies of iGSM structure graphs (Physics of LMs 2.1, Sec. 2), shipped as code.

Each world is a chain of four categories from the outermost to the innermost (a School has Classrooms,
a Classroom has Backpacks, ...); a problem of d layers takes d consecutive categories of one world and a
few item names of each. Names are unique within a world and contain no "'s", digits, commas, periods,
semicolons, "=" or " and ", so that every "X's Y" of a problem or solution parses back to one parameter.
"""

from __future__ import annotations

# (category, item names) from the outermost layer to the innermost, four per world.
WORLDS: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (
        ("School", ("Riverview High", "Central High", "Oakwood Academy", "Pinecrest School", "Lakeside High",
                    "Hillcrest Prep", "Maple Grove School", "Summit Academy", "Brookfield High")),
        ("Classroom", ("Film Studio", "Dance Studio", "Music Room", "Science Lab", "Art Room", "Computer Lab",
                       "Reading Room", "Chemistry Lab", "Drama Room")),
        ("Backpack", ("School Daypack", "Messenger Backpack", "Canvas Backpack", "Hiking Backpack",
                      "Rolling Backpack", "Sling Bag", "Laptop Backpack", "Drawstring Bag", "Tote Backpack")),
        ("Stationery", ("Calculator", "Scissors", "Ruler", "Pencil Case", "Glue Stick", "Stapler", "Eraser",
                        "Highlighter", "Protractor")),
    ),
    (
        ("City", ("Springfield", "Riverton", "Fairhaven", "Brookside", "Ashford", "Millbrook", "Northport",
                  "Eastwick", "Glenwood")),
        ("Zoo", ("Sunny Valley Zoo", "Riverside Zoo", "Green Hills Zoo", "Bayview Zoo", "Cedar Park Zoo",
                 "Golden Plains Zoo", "Silver Lake Zoo", "Wildwood Zoo", "Harbor Zoo")),
        ("Enclosure", ("Penguin Beach", "Octopus Den", "Reptile House", "Bird Aviary", "Monkey Island",
                       "Bear Canyon", "Savanna Plain", "Night House", "Rainforest Dome")),
        ("Animal", ("Giraffe", "Leopard", "Zebra", "Flamingo", "Tortoise", "Meerkat", "Lemur", "Otter",
                    "Peacock")),
    ),
    (
        ("District", ("Financial District", "Arts District", "Harbor District", "Market District",
                      "University District", "Garden District", "Tech District", "Old Town", "Fashion District")),
        ("Supermarket", ("Fresh Mart", "Green Grocer", "Value Foods", "Corner Market", "Sunrise Market",
                         "Harvest Foods", "Family Grocer", "Urban Pantry", "Daily Basket")),
        ("Cooler", ("Dairy Cooler", "Drink Cooler", "Freezer Chest", "Produce Case", "Deli Case", "Meat Case",
                    "Bakery Case", "Snack Fridge", "Flower Fridge")),
        ("Product", ("Orange Juice", "Almond Milk", "Yogurt Cup", "Cheese Block", "Ice Cream Tub", "Lemonade",
                     "Cold Brew", "Sparkling Water", "Kombucha")),
    ),
    (
        ("Region", ("Northern Plains", "Eastern Valley", "Southern Hills", "Western Highlands", "Central Basin",
                    "Coastal Lowlands", "River Delta", "Lake Country", "Mountain Foothills")),
        ("Farm", ("Sunny Acres", "Green Meadow Farm", "Willow Creek Farm", "Oak Hill Farm", "Red Barn Farm",
                  "Golden Field Farm", "Blue Sky Ranch", "Pine Ridge Farm", "Clover Farm")),
        ("Field", ("North Field", "South Field", "East Pasture", "West Pasture", "River Field", "Hill Field",
                   "Orchard Field", "Creek Field", "Valley Field")),
        ("Crop", ("Wheat", "Corn", "Barley", "Soybean", "Oat", "Rye", "Sunflower", "Potato", "Pumpkin")),
    ),
    (
        ("Province", ("Northshire", "Eastmoor", "Southvale", "Westbrook", "Lakeshire", "Highmoor", "Greenvale",
                      "Stonebrook", "Fairmont")),
        ("Hospital", ("Saint Mary Hospital", "General Hospital", "Mercy Hospital", "City Clinic",
                      "Lakeview Hospital", "Hope Medical Center", "Grace Hospital", "Unity Hospital",
                      "Valley Hospital")),
        ("Ward", ("Maternity Ward", "Surgery Ward", "Pediatric Ward", "Cardiology Ward", "Emergency Ward",
                  "Oncology Ward", "Neurology Ward", "Recovery Ward", "Burn Unit")),
        ("Equipment", ("Heart Monitor", "Wheelchair", "Oxygen Tank", "Infusion Pump", "Hospital Bed",
                       "Defibrillator", "Ventilator", "Stretcher", "Blood Pressure Cuff")),
    ),
    (
        ("University", ("Northgate University", "Lakeside University", "Hillview College", "Riverside College",
                        "Kingsbridge University", "Elmwood College", "Stonegate University", "Bayside College",
                        "Redwood University")),
        ("Library", ("Science Library", "Law Library", "Medical Library", "Music Library", "Art Library",
                     "History Library", "Engineering Library", "Main Library", "Rare Book Library")),
        ("Shelf", ("Oak Shelf", "Steel Shelf", "Corner Shelf", "Rolling Shelf", "Glass Cabinet", "Wall Shelf",
                   "Tall Bookcase", "Low Bookcase", "Display Rack")),
        ("Book", ("Novel", "Atlas", "Dictionary", "Cookbook", "Biography", "Encyclopedia", "Poetry Book",
                  "Comic Book", "Textbook")),
    ),
)

# Variables of the solution steps ("Define Riverview High's Film Studio as p"), drawn without replacement.
SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
